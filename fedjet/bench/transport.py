"""``fedjet bench transport --mb 400``: one big update through JetStream, against raw publishes.

Both legs run against the same embedded nats-server in the same sitting, alternated
(raw, fedjet, raw, fedjet, ...), and each ends when a reader in a second process has every
byte. **Raw**: nats-py publishes the same number of bytes, in chunks of the same size, to a
JetStream stream with the same window of unacked bytes in flight as fedjet's publisher; a plain
pull consumer in another process fetches and acks them. **fedjet**: a worker's ``UpdateSender``
seals the payload to the coordinator chunk by chunk as it publishes it; the coordinator's
``UpdateInbox`` in the other process fetches, opens the envelope segment by segment as its
chunks arrive, within its budgets, and acks. Each time runs from the first publish (the start of
sealing) to the reader's last byte; the legs' medians give the ratio. ``peak_rss_mb`` is the
fedjet reader's (the coordinator side's) peak resident set, ``rss_vs_update`` what it grew by
beyond the interpreter and its imports (``baseline_rss_mb``), per byte of update;
``raw_reader_peak_rss_mb`` is the raw reader's, for comparison.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedjet.bench.coordinator_memory import coordinator_receives
from fedjet.broker.blob_publish import PUBLISH_WINDOW_BYTES
from fedjet.broker.blobs import chunk_size_for
from fedjet.broker.connect import connect_client
from fedjet.broker.jetstream import close_quietly, ensure_job_streams
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.updates import UpdateInbox, UpdateSender
from fedjet.codecs.crypto import envelope_limit
from fedjet.keystore import coordinator_boxes, generate, member_boxes
from fedjet.lifetime import peak_rss_mb

JOB = "transport"
RAW_STREAM, RAW_SUBJECT = "RAW", "raw.data"


def payload_of(mb: int) -> bytes:
    return np.random.default_rng(0).bytes(mb * 1_000_000)


async def raw_publish(url: str, data: bytes, max_payload: int) -> float:
    """Publish ``data`` as plain JetStream messages with fedjet's window of unacked bytes;
    returns when (epoch seconds) the first publish went out."""
    nc = await connect_client(url, "raw")
    js = nc.jetstream()
    try:
        step = chunk_size_for(max_payload)
        window = max(1, PUBLISH_WINDOW_BYTES // step)
        view = memoryview(data)
        started = time.time()
        futures: list[Any] = []
        acked = 0
        for i in range(-(-len(data) // step)):
            if len(futures) - acked >= window:  # wait for the oldest chunk in flight, as fedjet does
                await futures[acked]
                acked += 1
            chunk = bytes(view[i * step : (i + 1) * step])
            futures.append(await js.publish_async(RAW_SUBJECT, chunk, headers={"Nats-Msg-Id": f"raw-{i}"}))
        await asyncio.gather(*futures[acked:])
        return started
    finally:
        await close_quietly(nc)


async def read_raw(url: str, size: int) -> dict[str, Any]:
    """The raw leg's reader: a plain pull consumer that fetches and acks until ``size`` bytes."""
    nc = await connect_client(url, "raw-reader")
    js = nc.jetstream()
    try:
        sub = await js.pull_subscribe(RAW_SUBJECT, durable="raw-reader", stream=RAW_STREAM)
        baseline = peak_rss_mb()
        print("ready", flush=True)
        digest, got = hashlib.sha256(), 0
        while got < size:
            try:
                msgs = await sub.fetch(8, timeout=5.0)
            except TimeoutError:
                continue
            for msg in msgs:
                digest.update(msg.data)
                got += len(msg.data)
                await msg.ack()
        done = time.time()
        return {"done": done, "sha256": digest.hexdigest(), "peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline}
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
        baseline = peak_rss_mb()  # the interpreter and its imports, before any byte arrives
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
                plain, peak = arrival.blob.data, peak_rss_mb()
                return {
                    "done": done,
                    "sha256": hashlib.sha256(plain).hexdigest(),
                    "peak_rss_mb": peak,
                    "baseline_mb": baseline,
                }
    finally:
        await inbox.close()
        await close_quietly(nc)


def run(mb: int = 400, repeats: int = 2, coordinator_model: str | None = "base") -> dict[str, Any]:
    """Both legs ``repeats`` times each, alternated, each on a fresh server; medians and every
    run; then (unless ``coordinator_model`` is None) a real coordinator receiving and
    aggregating one dense update of that model (:mod:`fedjet.bench.coordinator_memory`)."""
    data = payload_of(mb)
    expected = hashlib.sha256(data).hexdigest()
    size_mb = len(data) / 1e6
    legs: dict[str, list[dict[str, Any]]] = {"raw": [], "fedjet": []}
    with tempfile.TemporaryDirectory(prefix="fedjet-transport-") as work:
        keys = str(Path(work) / "keys")
        generate(keys, ["aws", "eval"])  # the coordinator of the second figure seals versions to an observer too
        for attempt in range(repeats):
            for leg in ("raw", "fedjet"):
                server = EmbeddedNatsServer(Path(work) / f"js-{leg}-{attempt}", max_payload=8 << 20)
                url = server.start()
                try:
                    legs[leg].append(_leg(leg, url, keys, data, server.max_payload))
                finally:
                    server.stop()
        coordinator = None
        if coordinator_model is not None:
            server = EmbeddedNatsServer(Path(work) / "js-coordinator", max_payload=8 << 20)
            url = server.start()
            try:
                coordinator = coordinator_receives(url, keys, Path(work), coordinator_model)
            finally:
                server.stop()
    raw_s = statistics.median(r["seconds"] for r in legs["raw"])
    fedjet_s = statistics.median(r["seconds"] for r in legs["fedjet"])
    fedjet_peak = max(r["peak_rss_mb"] for r in legs["fedjet"])
    fedjet_base = min(r["baseline_mb"] for r in legs["fedjet"])
    return {
        "mb": size_mb,
        "mb_s": size_mb / fedjet_s,
        "raw_mb_s": size_mb / raw_s,
        "ratio_to_raw": raw_s / fedjet_s,
        "runs": {leg: [round(size_mb / r["seconds"], 1) for r in rows] for leg, rows in legs.items()},
        "peak_rss_mb": fedjet_peak,
        "baseline_rss_mb": fedjet_base,
        "rss_vs_update": (fedjet_peak - fedjet_base) / size_mb,
        "raw_reader_peak_rss_mb": max(r["peak_rss_mb"] for r in legs["raw"]),
        "memory_of": "the reader processes: fedjet's is the coordinator's inbox, raw's a plain pull consumer",
        "intact": all(r["sha256"] == expected for rows in legs.values() for r in rows),
        "coordinator": coordinator,
    }


def _leg(leg: str, url: str, keys: str, data: bytes, max_payload: int) -> dict[str, Any]:
    """One leg: its reader in a second process, then the publishes; seconds to the last byte."""
    asyncio.run(_streams(url))
    reader = subprocess.Popen(
        [sys.executable, "-m", "fedjet.bench.transport", f"--read-{leg}", url, keys, str(len(data))],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "FEDJET_LOG_LEVEL": "error"},
    )  # fmt: skip
    assert reader.stdout is not None
    if reader.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {leg} reader process did not start")
    if leg == "raw":
        started = asyncio.run(raw_publish(url, data, max_payload))
    else:
        started = asyncio.run(send(url, keys, data))
    out, _ = reader.communicate(timeout=1800)
    got = json.loads(out.strip().splitlines()[-1])
    return {**got, "seconds": got["done"] - started}


async def _streams(url: str) -> None:
    nc = await connect_client(url, "setup")
    try:
        await ensure_job_streams(nc.jetstream(), JobSubjects(JOB))
        await nc.jetstream().add_stream(name=RAW_STREAM, subjects=[RAW_SUBJECT])
    finally:
        await close_quietly(nc)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--read-fedjet":
        print(json.dumps(asyncio.run(read(sys.argv[2], sys.argv[3], int(sys.argv[4])))), flush=True)
    elif len(sys.argv) == 5 and sys.argv[1] == "--read-raw":
        print(json.dumps(asyncio.run(read_raw(sys.argv[2], int(sys.argv[4])))), flush=True)


if __name__ == "__main__":
    main()
