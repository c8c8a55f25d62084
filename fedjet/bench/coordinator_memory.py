"""The second figure of ``fedjet bench transport``: a real coordinator process receiving,
opening, admitting and aggregating one dense update of a large model, and what that costs it in
memory beyond what it held before the update arrived.

The bench plays the one cloud: it seals a dense update of the model the coordinator published
as version 0 (as a worker does) and waits for version 1. The coordinator's peak resident set is
reset (``/proc/PID/clear_refs``) once version 0 is out, so the peak is the update's alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.connect import connect_client
from fedjet.broker.jetstream import close_quietly
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.codecs import crypto
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHead, Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.errors import BrokerError
from fedjet.keystore import member_boxes
from fedjet.models.build import initial_model, parameter_tensors
from fedjet.runner.processes import spawn, stop_all


def coordinator_receives(url: str, keys: str, work: Path, model: str) -> dict[str, Any]:
    """Run a coordinator of ``model`` and feed it one dense update."""
    job = f"transport-{uuid.uuid4().hex[:6]}"
    # two rounds: it waits for the second, alive, while its memory is read after the first
    args = ["coordinator", "--nats", url, "--keys", keys, "--job", job, "--clouds", "aws", "--rounds", "2"]
    child = spawn("coordinator", [*args, "--codec", "dense", "--model", model, "--seed", "0"], work)
    try:
        return asyncio.run(_feed(url, keys, job, model, child))
    finally:
        stop_all([child])


async def _feed(url: str, keys: str, job: str, model: str, child: Any) -> dict[str, Any]:
    subjects = JobSubjects(job)
    nc = await connect_client(url, "transport-cloud")
    js = nc.jetstream()
    boxes = member_boxes(keys, "aws")
    follower = GlobalFollower(js, subjects, boxes, Limits())  # reads and verifies heads only
    try:
        await _version(follower, 0, child)
        template = parameter_tensors(initial_model(model, vocab_size=257, eos_id=256, seed=0))
        delta = {n: torch.full(t.shape, 1e-4) for n, t in template.items()}
        header = UpdateHeader(job=job, cloud="aws", worker="0", seq=time.time_ns() // 1000, base_version=0,
                              samples=8, loss=1.0)  # fmt: skip
        frame = encode_update(Update(header, delta), CodecSpec.parse("dense"))
        sealed = crypto.seal_update(frame, boxes)
        del template, delta, frame
        before = await asyncio.to_thread(_reset_peak, child.proc.pid)
        started = time.perf_counter()
        blob_id = f"aws/0/{header.seq}"
        await publish_blob(js, subjects.update("aws"), sealed, blob_id=blob_id, max_payload=nc.max_payload)
        await _version(follower, 1, child)
        seconds = time.perf_counter() - started
        after = await asyncio.to_thread(_status, child.proc.pid)
    finally:
        await close_quietly(nc)
    update_mb = len(sealed) / 1e6
    return {
        "model": model,
        "update_mb": update_mb,
        "seconds_to_version_1": seconds,
        "rss_before_update_mb": before["VmRSS"],
        "peak_rss_mb": after["VmHWM"],
        "peak_vs_update": (after["VmHWM"] - before["VmRSS"]) / update_mb,
    }


async def _version(follower: GlobalFollower, version: int, child: Any) -> GlobalHead:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if child.returncode is not None:
            raise BrokerError(f"the coordinator exited with {child.returncode}: {child.log_tail()}")
        latest = await follower.read_latest()
        if latest is not None and latest.head.version >= version:
            return latest.head
        await asyncio.sleep(0.2)
    raise BrokerError(f"the coordinator published no version {version} within 600 s")


def _reset_peak(pid: int) -> dict[str, float]:
    """``pid``'s status now, then its peak resident set reset to its current one."""
    status = _status(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid``, in MB (10^6 bytes, as the update's size)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024 / 1e6  # the kernel counts kB of 1024 bytes
    return out
