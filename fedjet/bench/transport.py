"""``fedjet bench transport --mb 400``: one big update through JetStream, against raw publishes.

Both legs run against the same embedded nats-server in the same sitting. **Raw**: nats-py
publishes the same number of bytes, in chunks of the same size, to a JetStream stream with
the same bounded window of async publishes, and waits for every ack. **fedjet**: a worker's
``UpdateSender`` seals the payload to the coordinator chunk by chunk as it publishes it; the
coordinator's ``UpdateInbox`` in a separate process (so its memory is its own) fetches, opens
the envelope segment by segment as its chunks arrive, within its budgets, and acks. The time
runs from the start of sealing to the opened plaintext; ``peak_rss_mb`` is that reader process's peak resident set,
and ``rss_vs_update`` what it grew by, beyond the interpreter and its imports
(``baseline_rss_mb``), per byte of update.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedjet.broker.blobs import chunk_size_for
from fedjet.broker.connect import connect_client
from fedjet.broker.jetstream import close_quietly, ensure_job_streams
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.updates import UpdateInbox, UpdateSender
from fedjet.codecs.crypto import envelope_limit
from fedjet.keystore import coordinator_boxes, generate, member_boxes

JOB = "transport"
WINDOW = 64  # async publishes in flight for the raw leg (nats-py's own default stall window)


def payload_of(mb: int) -> bytes:
    return np.random.default_rng(0).bytes(mb * 1_000_000)


async def raw_publish(url: str, data: bytes, max_payload: int) -> float:
    """Seconds for nats-py to publish ``data`` as JetStream messages and get every ack."""
    nc = await connect_client(url, "raw")
    js = nc.jetstream()
    try:
        await js.add_stream(name="RAW", subjects=["raw.>"])
        step = chunk_size_for(max_payload)
        view = memoryview(data)
        started = time.perf_counter()
        pending: list[Any] = []
        for i in range(-(-len(data) // step)):
            chunk = bytes(view[i * step : (i + 1) * step])
            pending.append(await js.publish_async("raw.data", chunk, headers={"Nats-Msg-Id": f"raw-{i}"}))
            if len(pending) >= WINDOW:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return time.perf_counter() - started
    finally:
        await close_quietly(nc)


async def send(url: str, keys: str, data: bytes) -> float:
    """When (epoch seconds) sealing started; returns once every chunk is acked."""
    nc = await connect_client(url, "sender")
    js = nc.jetstream()
    try:
        sender = UpdateSender(js, JobSubjects(JOB), member_boxes(keys, "aws"), "aws", "0", max_payload=nc.max_payload)
        started = time.time()
        await sender.send(data, 1)
        return started
    finally:
        await close_quietly(nc)


async def read(url: str, keys: str, size: int) -> dict[str, Any]:
    """The coordinator's side: reassemble and open one update; when it was done, and memory."""
    nc = await connect_client(url, "reader")
    js = nc.jetstream()
    subjects = JobSubjects(JOB)
    boxes = coordinator_boxes(keys, ["aws"])
    inbox = UpdateInbox(
        js, subjects, max_blob_bytes=envelope_limit(size), clouds=["aws"], max_payload=nc.max_payload, boxes=boxes
    )
    try:
        await inbox.open(1)
        baseline = _peak_rss_mb()  # the interpreter and its imports, before any byte arrives
        print("ready", flush=True)
        while True:
            for msg in await inbox.fetch(timeout=1.0):
                arrival = await inbox.receive(msg, time.monotonic())
                if arrival is None:
                    continue
                if arrival.blob is None:
                    raise RuntimeError(f"the update was refused: {arrival.error}")
                await inbox.ack(arrival.msgs)
                done = time.time()
                plain, peak = arrival.blob.data, _peak_rss_mb()
                return {
                    "done": done,
                    "sha256": hashlib.sha256(plain).hexdigest(),
                    "peak_rss_mb": peak,
                    "baseline_mb": baseline,
                }
    finally:
        await inbox.close()
        await close_quietly(nc)


def _peak_rss_mb() -> float:
    """This process's resident high-water mark. ``VmHWM`` starts afresh at exec, unlike
    ``ru_maxrss``, which a child inherits from the parent that started it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run(mb: int = 400) -> dict[str, Any]:
    data = payload_of(mb)
    with tempfile.TemporaryDirectory(prefix="fedjet-transport-") as work:
        keys = str(Path(work) / "keys")
        generate(keys, ["aws"])
        server = EmbeddedNatsServer(Path(work) / "js", max_payload=8 << 20)
        url = server.start()
        try:
            raw_s = asyncio.run(raw_publish(url, data, server.max_payload))
            asyncio.run(_streams(url))
            reader = subprocess.Popen(
                [sys.executable, "-m", "fedjet.bench.transport", "--read", url, keys, str(len(data))],
                stdout=subprocess.PIPE, text=True, env={**os.environ, "FEDJET_LOG_LEVEL": "error"},
            )  # fmt: skip
            assert reader.stdout is not None
            if reader.stdout.readline().strip() != "ready":
                raise RuntimeError("the reader process did not start")
            started = asyncio.run(send(url, keys, data))
            out, _ = reader.communicate(timeout=1800)
            got = json.loads(out.strip().splitlines()[-1])
        finally:
            server.stop()
    seconds = got["done"] - started
    size_mb = len(data) / 1e6
    return {
        "mb": size_mb,
        "mb_s": size_mb / seconds,
        "raw_mb_s": size_mb / raw_s,
        "ratio_to_raw": raw_s / seconds,
        "peak_rss_mb": got["peak_rss_mb"],
        "baseline_rss_mb": got["baseline_mb"],
        "rss_vs_update": (got["peak_rss_mb"] - got["baseline_mb"]) / size_mb,
        "intact": got["sha256"] == hashlib.sha256(data).hexdigest(),
    }


async def _streams(url: str) -> None:
    nc = await connect_client(url, "setup")
    try:
        await ensure_job_streams(nc.jetstream(), JobSubjects(JOB))
    finally:
        await close_quietly(nc)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--read":
        print(json.dumps(asyncio.run(read(sys.argv[2], sys.argv[3], int(sys.argv[4])))), flush=True)


if __name__ == "__main__":
    main()
