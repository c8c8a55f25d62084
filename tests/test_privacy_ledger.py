"""The privacy ledger survives restarts: a coordinator killed and started again keeps refusing a
cloud that rewinds its step count (its budget is recorded in every version), and a worker
restarted on a cloud starts its ledger from the steps recorded for that cloud."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.codecs import crypto
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import DPClaim, GlobalHead, Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.keystore import coordinator_boxes, generate, load_public, member_boxes
from fedjet.models.build import initial_model, parameter_tensors
from fedjet.privacy.accounting import epsilon_for
from tests.conftest import FedjetProcess

JOB = "ledger"
CLOUDS = ("aws", "gcp")
SUBJECTS = JobSubjects(JOB)
NOISE, RATE, DELTA, STEPS = 1.0, 0.01, 1e-5, 4
BUDGET = epsilon_for(NOISE, RATE, 2 * STEPS, DELTA)  # two updates of 4 steps each, and no more


def coordinator(url: str, keys) -> FedjetProcess:
    args = ["coordinator", "--nats", url, "--keys", str(keys), "--job", JOB, "--clouds", ",".join(CLOUDS)]
    args += ["--strategy", "async", "--max-updates", "4", "--codec", "dense", "--model", "tiny", "--seed", "3"]
    args += ["--local-steps", str(STEPS), "--observers", "eval", "--dp", f"epsilon={BUDGET},delta={DELTA},clip=1.0"]
    return FedjetProcess(*args)


def claim(steps: int) -> DPClaim:
    epsilon = epsilon_for(NOISE, RATE, steps, DELTA)
    return DPClaim(epsilon=epsilon, delta=DELTA, noise=NOISE, sample_rate=RATE, clip=1.0, steps=steps)


def worker(url: str, keys, cloud: str, data_dir, log: Path) -> FedjetProcess:
    args = ["worker", "--nats", url, "--keys", str(keys), "--job", JOB, "--cloud", cloud]
    args += ["--data", str(data_dir), "--deal", "--wait-spec", "60"]
    return FedjetProcess(*args, log=log)


@dataclass
class Broker:
    """The test's side of the broker: sealed updates in as a cloud would send them, verified heads out."""

    keys: Path
    template: dict[str, torch.Tensor]
    nc: Any
    js: Any

    def envelope(self, cloud: str, seq: int, base: int, steps: int) -> bytes:
        header = UpdateHeader(
            job=JOB, cloud=cloud, worker="0", seq=seq, base_version=base, samples=8, loss=0.0, dp=claim(steps),
        )  # fmt: skip
        delta = {n: torch.full(t.shape, 1e-4) for n, t in self.template.items()}
        frame = encode_update(Update(header, delta), CodecSpec.parse("dense"))
        return crypto.seal_update(frame, member_boxes(self.keys, cloud))

    async def head(self) -> GlobalHead | None:
        try:
            raw = await self.js.get_last_msg(SUBJECTS.global_stream, SUBJECTS.global_head)
        except nats.js.errors.NotFoundError:  # no version yet
            return None
        return GlobalHead.verify(raw.data, load_public(self.keys, "coordinator"))

    async def wait_for(self, version: int, proc) -> GlobalHead:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() in (None, 0), proc.errors()[-2000:]
            found = await self.head()
            if found is not None and found.version >= version:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"version {version} never appeared")

    async def publish(self, cloud: str, seq: int, base: int, steps: int) -> None:
        data = self.envelope(cloud, seq, base, steps)
        await publish_blob(self.js, SUBJECTS.update(cloud), data, blob_id=f"{cloud}/0/{seq}",
                           max_payload=self.nc.max_payload)  # fmt: skip


def output_of(proc: FedjetProcess) -> str:
    """What ``proc`` wrote before it exited on its own (within 180 s)."""
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        tail = proc.communicate()[0][-3000:]
        raise AssertionError(f"the restarted worker kept running: {tail!r}") from None
    return output


def test_a_restarted_coordinator_and_worker_keep_the_clouds_privacy_ledger(tmp_path, nats_server, data_dir):
    keys = tmp_path / "keys"
    generate(keys, [*CLOUDS, "eval"])
    template = parameter_tensors(initial_model("tiny", vocab_size=257, eos_id=256, seed=3))

    async def scenario() -> None:
        first = coordinator(nats_server.url, keys)
        nc = await connect(nats_server.url, "test-workers")
        broker = Broker(keys, template, nc, nc.jetstream())
        try:
            await broker.wait_for(0, first)
            await broker.publish("aws", 1, 0, STEPS)
            await broker.wait_for(1, first)
            await broker.publish("aws", 2, 1, 2 * STEPS)  # aws's budget is now spent
            await broker.wait_for(2, first)
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            second = coordinator(nats_server.url, keys)
            # aws "restarts" and claims 4 steps again: within the budget on its own, but a rewind
            await broker.publish("aws", 3, 2, STEPS)
            await broker.publish("gcp", 1, 2, STEPS)
            latest = await broker.wait_for(3, second)
            follower = GlobalFollower(broker.js, SUBJECTS, coordinator_boxes(keys, [*CLOUDS, "eval"]), Limits())
            record = follower.record(latest)
            assert [c.cloud for c in record.contributions] == ["gcp"], "aws's rewound claim was applied"
            assert record.progress.rejected == {"PrivacyError": 1}
            assert record.progress.dp_steps == {"aws": 2 * STEPS, "gcp": STEPS}
            # A real aws worker started now (a restart on a new machine) starts from the 8 steps
            # the record holds for aws: its next update would overspend, so it retires unsent.
            output = output_of(worker(nats_server.url, keys, "aws", data_dir, tmp_path / "worker-aws.log"))
            assert "privacy_ledger_resumed" in output and "privacy_budget_spent" in output, output[-3000:]
            await broker.publish("gcp", 2, 3, 2 * STEPS)
            last = follower.record(await broker.wait_for(4, second))
            assert last.retired == ("aws",) and [c.cloud for c in last.contributions] == ["gcp"]
            assert last.progress.rejected == {"PrivacyError": 1}, "the restarted worker sent an update"
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=60)
        finally:
            await close_quietly(nc)

    asyncio.run(scenario())
