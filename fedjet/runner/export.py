"""``fedjet export``: a recorded global version as a standard checkpoint.

Opens the job like replay (``--store DIR`` or ``--nats URL``, the coordinator's keys), fetches
the version's weights through the same follower every worker uses (checked against the signed
hash), and writes safetensors, config, tokenizer and ``fedjet.json``. The exported weights hash
equals the recorded version hash.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedjet.broker.auth import ClientAuth
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.recorded import coordinator_view, keys_dir_for, only_job, recorded_jetstream
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHead
from fedjet.config.wire import to_wire
from fedjet.coordinator.central_dp import central_report
from fedjet.errors import ConfigError, FedjetError
from fedjet.export.checkpoint import write_checkpoint
from fedjet.models.job_model import preset_base_weights
from fedjet.privacy.accounting import claims_report
from fedjet.spec import JobSpec


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    out: str
    store: str | None = None
    nats_url: str | None = None
    job: str | None = None
    keys: str | None = None
    version: int | None = None  # default: the newest
    model: str | None = None  # the checkpoint the job started from (tokenizer files, LoRA base)
    merge: bool = False  # LoRA: write the merged full model (the adapter goes to OUT/adapter)
    auth: ClientAuth | None = None
    js_domain: str | None = None

    def __post_init__(self) -> None:
        if (self.store is None) == (self.nats_url is None):
            raise ConfigError("give exactly one of --store DIR or --nats URL")
        if self.version is not None and self.version < 0:
            raise ConfigError("--version must be >= 0")


@dataclass(frozen=True)
class Exported:
    out: str
    job: str
    version: int
    weights_sha256: str


def run_export(config: ExportConfig) -> Exported:
    return asyncio.run(_export(config))


async def _export(config: ExportConfig) -> Exported:
    async with recorded_jetstream(
        config.store, config.nats_url, "fedjet-export", auth=config.auth, domain=config.js_domain
    ) as js:
        subjects = JobSubjects(config.job or await only_job(js))
        return await export_version(js, subjects, keys_dir_for(config.keys, config.store), config)


async def export_version(js: Any, subjects: JobSubjects, keys_dir: str, config: ExportConfig) -> Exported:
    spec, boxes = await coordinator_view(js, subjects, keys_dir)
    follower = GlobalFollower(js, subjects, boxes, Limits())
    heads = await _heads(follower)
    head = _pick(heads, subjects, config.version)
    version = await follower.fetch(head)
    record = follower.record(head)
    info = {
        "job": spec.job,
        "version": head.version,
        "hash": head.hash,
        "final": head.final,
        "strategy": spec.strategy.name,
        "codec": spec.config.codec,
        "applied_updates": record.progress.applied_total,
        "config": to_wire(spec.config),
        "privacy": _privacy(follower, [h for v, h in sorted(heads.items()) if v <= head.version], spec),
    }
    written = await asyncio.to_thread(_write, config, spec, version.tensors, info)
    if written != head.hash:
        raise FedjetError(f"exported weights hash {written[:16]}… != recorded version hash {head.hash[:16]}…")
    return Exported(config.out, spec.job, head.version, written)


async def _heads(follower: GlobalFollower) -> dict[int, GlobalHead]:
    """Each version's newest head (a final marker re-announces the last version)."""
    return {signed.head.version: signed.head async for signed in follower.recorded_heads()}


def _pick(heads: dict[int, GlobalHead], subjects: JobSubjects, version: int | None) -> GlobalHead:
    if not heads:
        raise ConfigError(f"job {subjects.job!r} has no recorded global versions")
    wanted = max(heads) if version is None else version
    if wanted not in heads:
        raise ConfigError(f"version {wanted} is not recorded (have 0..{max(heads)})")
    return heads[wanted]


def _privacy(follower: GlobalFollower, heads: list[GlobalHead], spec: JobSpec) -> dict[str, Any] | None:
    """The ε/δ the exported weights were trained under (each cloud's newest claim up to them)."""
    claims = {c.cloud: c.dp for h in heads for c in follower.record(h).contributions if c.dp is not None}
    out: dict[str, Any] = claims_report(claims) if claims else {}
    central = spec.strategy.central_dp_config
    if central is not None:
        out["central"] = central_report(central, heads[-1].version)
    return out or None


def _write(config: ExportConfig, spec: JobSpec, tensors: dict[str, Any], info: dict[str, Any]) -> str:
    tokenizer: str | Path | None = "bytes"
    if spec.tokenizer_sha256:
        if config.model is None:
            raise ConfigError(f"job {spec.job} uses its checkpoint's tokenizer: give --model PATH to export it")
        tokenizer = config.model
    if spec.config.peft is None:
        return write_checkpoint(config.out, spec.model_config, tensors, tokenizer, info)
    base_weights = {} if config.model else preset_base_weights(spec)
    return write_checkpoint(
        config.out,
        spec.model_config,
        base_weights,
        tokenizer,
        info,
        peft_spec=spec.config.peft,
        adapter_weights=tensors,
        base_model_dir=config.model,
        merge=config.merge,
    )
