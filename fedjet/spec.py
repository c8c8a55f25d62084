"""The job spec: everything a worker must agree on with the coordinator, published once.

It carries the typed :class:`JobConfig` plus what the coordinator derived from it (the model's
architecture, the tokenizer, and the traits of the chosen strategy that workers act on). The
coordinator writes it, signed, to the job's KV bucket; workers read it instead of being
configured one by one, so three clouds cannot drift apart on model, codec or training settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedjet.codecs import crypto
from fedjet.codecs.crypto import Identity, PublicIdentity
from fedjet.codecs.fragments import FragmentPlan
from fedjet.config.job import ISLAND_PHASES, JobConfig, PartitionConfig, StopConfig, StrategyConfig, TrainConfig
from fedjet.config.wire import WireError, from_wire, to_wire
from fedjet.errors import ConfigError, SchemaError

SPEC_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: the flat layout of the first batch (stores it recorded replay)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    config: JobConfig
    model_config: dict[str, Any]
    tokenizer: str = "bytes"
    tokenizer_sha256: str = ""  # of the checkpoint's tokenizer files; a worker with other files refuses
    base_hash: str = ""  # LoRA: the frozen base's weights hash, which every cloud must hold
    synchronous: bool = True
    update_kind: str = "delta"
    delta_reference: str = "base"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def job(self) -> str:
        return self.config.job

    @property
    def clouds(self) -> tuple[str, ...]:
        return self.config.clouds

    @property
    def observers(self) -> tuple[str, ...]:
        return self.config.observers

    @property
    def strategy(self) -> StrategyConfig:
        return self.config.strategy

    @property
    def fragment_plan(self) -> FragmentPlan | None:
        """``--fragments F``: which tensors each fragment holds (None: the whole model each round)."""
        raw = self.extra.get("fragments")
        if raw is None:
            return None
        plan = FragmentPlan.from_wire(raw)
        if plan.count != self.config.train.fragments:
            raise SchemaError(
                f"the spec plans {plan.count} fragments but says --fragments {self.config.train.fragments}"
            )
        return plan

    def expected_tensors(self, base_version: int, names: Sequence[str]) -> tuple[str, ...]:
        """The tensors an update on ``base_version`` carries: all ``names``, or with fragments
        the fragment that version's round synchronises."""
        plan = self.fragment_plan
        return tuple(names) if plan is None else plan.names(plan.of_version(base_version))

    @property
    def island_policy(self) -> str:
        """What a cut-off cloud contributes: ``--island``, or by default ``queue`` where updates
        are deltas summed onto the current global (fedbuff) or gradients (gradient), and
        ``accumulate`` where a round takes one update per cloud (the synchronous delta rules) or
        an update is a model mixed into the global (async: each stale model estimate pulls the
        global back towards its old base, so an island's phases go in once)."""
        chosen = self.config.train.island
        if chosen is not None:
            return chosen
        if self.update_kind == "gradient" or self.delta_reference == "last_send":
            return "queue"
        return "accumulate"

    @property
    def island_max_steps(self) -> int:
        """Local steps an island trains past its newest version before it waits for the link."""
        train = self.config.train
        return train.island_max_steps if train.island_max_steps is not None else ISLAND_PHASES * train.local_steps

    def cloud_index(self, cloud: str) -> int:
        try:
            return self.clouds.index(cloud)
        except ValueError as e:
            raise ConfigError(f"cloud {cloud!r} is not part of job {self.job} {self.clouds}") from e

    def same_job(self, other: JobSpec) -> bool:
        """Equal but for the stop conditions (a restart may extend a job's rounds)."""
        return _without_stop(self).to_bytes() == _without_stop(other).to_bytes()

    def to_bytes(self) -> bytes:
        return json.dumps({"spec_version": SPEC_VERSION, **to_wire(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> JobSpec:
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SchemaError(f"job spec is not JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("spec_version") not in READABLE_VERSIONS:
            raise SchemaError("job spec has an unknown version")
        try:
            if raw["spec_version"] == 1:
                raw = _upgrade_v1(raw)
            return from_wire(cls, raw)
        except (WireError, KeyError, TypeError) as e:
            raise SchemaError(f"job spec is unusable: {e}") from e


def _without_stop(spec: JobSpec) -> JobSpec:
    return replace(spec, config=replace(spec.config, stop=StopConfig()))


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """The first batch's flat spec as a version 2 one."""
    config = JobConfig(
        job=raw["job"],
        clouds=tuple(raw["clouds"]),
        observers=tuple(raw.get("observers", ())),
        seed=int(raw.get("seed", 0)),
        codec=raw.get("codec", "dense"),
        strategy=from_wire(StrategyConfig, raw.get("strategy_config") or {"name": raw.get("strategy", "fedavg")}),
        train=from_wire(TrainConfig, raw.get("train", {})),
        partition=PartitionConfig(scheme=raw.get("partition", "fixed"), alpha=float(raw.get("alpha", 0.5))),
    )
    keep = ("model_config", "tokenizer", "synchronous", "update_kind", "delta_reference", "extra")
    return {"config": to_wire(config), **{k: raw[k] for k in keep if k in raw}}


def sign_spec(spec: JobSpec, coordinator: Identity) -> bytes:
    return crypto.sign(spec.to_bytes(), coordinator)


def verify_spec(data: bytes, coordinator: PublicIdentity) -> JobSpec:
    """A spec counts only if the coordinator signed it."""
    return JobSpec.from_bytes(crypto.verify(data, coordinator))
