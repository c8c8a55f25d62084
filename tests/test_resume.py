"""Exactly once: a coordinator killed with SIGKILL mid-round resumes from JetStream without losing
or double-applying an update, and the whole run still replays bit for bit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.messages import GlobalHead, Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.coordinator.aggregate import Contribution
from fedjet.coordinator.strategies import Aggregator, Applied, StrategyConfig
from fedjet.keystore import generate, load_public, member_boxes
from fedjet.models.build import initial_model, parameter_tensors
from tests.conftest import FedjetProcess, run_fedjet

JOB = "resume"
CLOUDS = ("aws", "gcp")
SUBJECTS = JobSubjects(JOB)
CODEC = CodecSpec.parse("topk:0.2+int8")


def coordinator(url: str, keys) -> FedjetProcess:
    args = ["coordinator", "--nats", url, "--keys", str(keys), "--job", JOB, "--clouds", ",".join(CLOUDS)]
    args += ["--rounds", "3", "--codec", "topk:0.2+int8", "--model", "tiny", "--seed", "3", "--observers", "eval"]
    return FedjetProcess(*args)


def delta_for(cloud: str, round_: int, template) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * round_ + len(cloud))
    return {n: torch.randn(t.shape, generator=gen) * 1e-3 for n, t in template.items()}


@dataclass
class Broker:
    """The test's side of the broker: each cloud's sealed updates in (kept in ``sent``), heads out."""

    keys: Path
    boxes: dict[str, Any]
    template: dict[str, torch.Tensor]
    nc: Any
    js: Any
    sent: dict[tuple[str, int], bytes]

    def envelope(self, cloud: str, round_: int) -> bytes:
        header = UpdateHeader(
            job=JOB,
            cloud=cloud,
            worker="0",
            seq=1000 + round_,
            base_version=round_ - 1,
            samples=8 + len(cloud),
            loss=3.0 - 0.1 * round_,
        )
        self.sent[cloud, round_] = encode_update(Update(header, delta_for(cloud, round_, self.template)), CODEC)
        return crypto.seal_update(self.sent[cloud, round_], self.boxes[cloud])

    async def head_version(self) -> int:
        raw = await self.js.get_last_msg(SUBJECTS.global_stream, SUBJECTS.global_head)
        return GlobalHead.verify(raw.data, load_public(self.keys, "coordinator")).version

    async def wait_for(self, version: int, proc) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() in (None, 0), proc.errors()[-2000:]
            try:
                if await self.head_version() >= version:
                    return
            except nats.js.errors.NotFoundError:  # the coordinator has not made the stream yet
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"version {version} never appeared")

    async def publish(self, cloud: str, round_: int) -> None:
        data = self.envelope(cloud, round_)
        await publish_blob(self.js, SUBJECTS.update(cloud), data, blob_id=f"{cloud}/0/{round_}",
                           max_payload=self.nc.max_payload)  # fmt: skip

    async def coordinator_consumer(self) -> Any:
        """The coordinator's consumer once it holds an update unacked (or after 10 s)."""
        for _ in range(200):
            info = await self.js.consumer_info(SUBJECTS.update_stream, SUBJECTS.coordinator_durable)
            if info.num_ack_pending >= 1:
                break
            await asyncio.sleep(0.05)
        return info


def folded_once_each(template: dict[str, torch.Tensor], sent: dict[tuple[str, int], bytes]) -> Aggregator:
    """The same updates folded once each, in order, by the pure aggregation code (summed as they
    come, as the live coordinator sums a FedAvg round)."""
    from fedjet.codecs.frame import Limits
    from fedjet.codecs.messages import decode_update

    expected = Aggregator(StrategyConfig(), dict(template))
    for round_ in (1, 2, 3):
        batch = []
        for cloud in ("aws", "gcp"):
            update = decode_update(sent[cloud, round_], Limits())
            h = update.header
            batch.append(Applied(Contribution(cloud, h.base_version, h.samples, h.loss, update.tensors), 0))
        expected.apply(batch, running=True)
    return expected


async def final_hash(url: str, keys: Path) -> str:
    nc = await connect(url, "check")
    try:
        raw = await nc.jetstream().get_last_msg(SUBJECTS.global_stream, SUBJECTS.global_head)
        return GlobalHead.verify(raw.data, load_public(keys, "coordinator")).hash
    finally:
        await close_quietly(nc)


def test_killed_coordinator_resumes_exactly_once(tmp_path, nats_server):
    keys = tmp_path / "keys"
    generate(keys, [*CLOUDS, "eval"])
    boxes = {c: member_boxes(keys, c) for c in CLOUDS}
    template = parameter_tensors(initial_model("tiny", vocab_size=257, eos_id=256, seed=3))
    sent: dict[tuple[str, int], bytes] = {}

    async def scenario() -> None:
        first = coordinator(nats_server.url, keys)
        nc = await connect(nats_server.url, "test-workers")
        broker = Broker(keys, boxes, template, nc, nc.jetstream(), sent)
        try:
            await broker.wait_for(0, first)
            for cloud in CLOUDS:
                await broker.publish(cloud, 1)
            await broker.wait_for(1, first)
            await broker.publish("aws", 2)  # read by the first coordinator, never acked ...
            info = await broker.coordinator_consumer()
            assert info.num_ack_pending == 1, "the first coordinator never held aws's round-2 update"
            os.kill(first.pid, signal.SIGKILL)  # ... because it dies mid-round
            first.wait()
            await broker.publish("gcp", 2)
            second = coordinator(nats_server.url, keys)
            await broker.wait_for(2, second)
            for cloud in CLOUDS:
                await broker.publish(cloud, 3)
            await broker.wait_for(3, second)
            assert second.wait(timeout=60) == 0
            third = coordinator(nats_server.url, keys)  # the job is over: a clean exit, with a message
            _, err = third.communicate(timeout=120)
            assert third.returncode == 0 and "has finished" in err
        finally:
            await close_quietly(nc)

    asyncio.run(scenario())

    expected = folded_once_each(template, sent)
    result = run_fedjet(
        "replay", "--nats", nats_server.url, "--job", JOB, "--keys", str(keys), "--verify", "--no-progress"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["mismatches"] == 0
    assert asyncio.run(final_hash(nats_server.url, keys)) == expected.hash
