"""``fedjet bench fragments --params N --fragments 1,8``: what streaming fragments do to the
coordinator's memory and to the clouds' upload rate, with synthetic dense updates of an
N-parameter GPT-2 through a real nats-server to a real coordinator process.

For each F the bench writes the model as a local checkpoint once, starts a coordinator of it
(``--fragments F --codec dense``, three clouds) and plays the three clouds itself: for each of F
rounds (one whole model's worth of fragments) every cloud seals and publishes the dense update of
that round's fragment, at the pace of ``--compute-s`` seconds of training per whole-model
synchronisation (fragment k at offset k·H/F, as Streaming DiLoCo staggers them), and waits for
the version. Reported per F: the coordinator's peak resident set over those rounds (reset once
version 0 is out, so it is the rounds' peak on top of what the coordinator holds anyway; both
are given), and the most the three clouds wrote to their NATS connection in any 1-second window.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from fedjet.bench.coordinator_memory import _reset_peak, _status, _version
from fedjet.broker.blobs import publish_blob
from fedjet.broker.connect import connect_client
from fedjet.broker.jetstream import close_quietly
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.socket_bytes import PeakRate
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.kv import read_spec
from fedjet.codecs import crypto
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.errors import ConfigError
from fedjet.keystore import generate, load_public, member_boxes
from fedjet.runner.processes import spawn, stop_all

CLOUDS = ("aws", "gcp", "azure")
VOCAB, POSITIONS = 257, 256


def gpt2_of(params: int) -> dict[str, int]:
    """A GPT-2 shape of about ``params`` parameters: width from the size, then the depth."""
    width = 256 if params < 20_000_000 else 1024 if params < 400_000_000 else 2048
    per_layer = 12 * width * width + 13 * width
    layers = max(1, round((params - (VOCAB + POSITIONS) * width) / per_layer))
    return {"n_embd": width, "n_layer": layers, "n_head": width // 64}


def write_checkpoint(params: int, out: Path) -> int:
    """A randomly initialised GPT-2 of about ``params`` parameters saved at ``out``; its size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=256, eos_token_id=256, **gpt2_of(params))
    with torch.no_grad():
        model = GPT2LMHeadModel(config).float()
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run(params: int, fragments: tuple[int, ...], compute_s: float) -> list[dict[str, Any]]:
    if params < 1_000_000 or not fragments or min(fragments) < 1 or not compute_s > 0:
        raise ConfigError("--params >= 1000000, --fragments F[,F...] each >= 1, --compute-s > 0")
    with tempfile.TemporaryDirectory(prefix="fedjet-fragments-") as tmp:
        work = Path(tmp)
        checkpoint = work / "model"
        numel = write_checkpoint(params, checkpoint)
        keys = str(work / "keys")
        generate(keys, [*CLOUDS, "eval"])
        results = []
        for count in fragments:
            server = EmbeddedNatsServer(work / f"js-{count}", max_payload=8 << 20)
            url = server.start()
            try:
                results.append(_one(url, keys, work, checkpoint, numel, count, compute_s))
            finally:
                server.stop()
        return results


def _one(url: str, keys: str, work: Path, checkpoint: Path, numel: int, count: int, compute_s: float) -> dict[str, Any]:
    job = f"fragments-{count}-{uuid.uuid4().hex[:6]}"
    rounds = count + 1  # alive, waiting for one more, while its memory is read after `count`
    args = ["coordinator", "--nats", url, "--keys", keys, "--job", job, "--clouds", ",".join(CLOUDS)]
    args += ["--rounds", str(rounds), "--codec", "dense", "--model", str(checkpoint), "--fragments", str(count)]
    child = spawn(f"coordinator-{count}", args, work)
    try:
        figures = asyncio.run(_play(url, keys, job, count, compute_s, child))
    finally:
        stop_all([child])
    model_mb = numel * 4 / 1e6
    return {
        "fragments": count,
        "params": numel,
        "model_mb": model_mb,
        **figures,
        "peak_vs_model": figures["coordinator_peak_rss_mb"] / model_mb,
    }


async def _play(url: str, keys: str, job: str, count: int, compute_s: float, child: Any) -> dict[str, Any]:
    subjects = JobSubjects(job)
    nc = await connect_client(url, "fragments-clouds")
    js = nc.jetstream(timeout=60.0)
    boxes = {cloud: member_boxes(keys, cloud) for cloud in CLOUDS}
    follower = GlobalFollower(js, subjects, boxes["aws"], Limits())
    rate = PeakRate(nc)
    sampling = asyncio.create_task(rate.run())
    try:
        await _version(follower, 0, child)
        spec = await read_spec(js, subjects, load_public(keys, "coordinator"))
        assert spec is not None
        plan = spec.fragment_plan
        shapes = _shapes(spec, plan)
        before = await asyncio.to_thread(_reset_peak, child.proc.pid)
        started = time.perf_counter()
        for version in range(count):
            names = shapes if plan is None else {n: shapes[n] for n in plan.names(plan.of_version(version))}
            await asyncio.sleep(max(0.0, started + (version + 1) * compute_s / count - time.perf_counter()))
            for cloud in CLOUDS:
                await _send(js, nc, subjects, job, cloud, version, names, boxes[cloud])
            await _version(follower, version + 1, child)
        after = await asyncio.to_thread(_status, child.proc.pid)
        seconds = time.perf_counter() - started
    finally:
        sampling.cancel()
        await close_quietly(nc)
    return {
        "coordinator_rss_before_mb": before["VmRSS"],
        "coordinator_peak_rss_mb": after["VmHWM"],
        "peak_up_mb_s": rate.peak / 1e6,
        "seconds": seconds,
    }


def _shapes(spec: Any, plan: Any) -> dict[str, tuple[int, ...]]:
    """Every exchanged tensor's shape, from the architecture in the spec (no weights needed)."""
    from fedjet.models.build import model_from_config

    with torch.device("meta"):
        model = model_from_config(spec.model_config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


async def _send(
    js: Any, nc: Any, subjects: JobSubjects, job: str, cloud: str, version: int, shapes: dict[str, tuple[int, ...]],
    boxes: Any,
) -> None:  # fmt: skip
    seq = time.time_ns() // 1000
    header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=seq, base_version=version, samples=8, loss=1.0)
    sealed = await asyncio.to_thread(_sealed, header, shapes, boxes)
    await publish_blob(js, subjects.update(cloud), sealed, blob_id=f"{cloud}/0/{seq}", max_payload=nc.max_payload)


def _sealed(header: UpdateHeader, shapes: dict[str, tuple[int, ...]], boxes: Any) -> bytes:
    """A dense update of the tensors ``shapes`` names, framed and sealed as a worker's."""
    delta = {n: torch.full(shape, 1e-4) for n, shape in shapes.items()}
    return crypto.seal_update(encode_update(Update(header, delta), CodecSpec.parse("dense")), boxes)
