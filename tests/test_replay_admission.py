"""Live and replay admit through one call, privacy budgets included. A DP job's update that is
over its cloud's budget is refused by the live coordinator; a coordinator that ignored the
budget records the same update as applied, and ``fedjet replay --verify`` refuses it there,
for the same reason, through the same ``Admission.check``. The honest record verifies."""

from __future__ import annotations

import asyncio

import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.messages import DPClaim, Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.config.job import JobConfig, StopConfig, StrategyConfig, TrainConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.privacy_check import PrivacyBudget
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.errors import FedjetError
from fedjet.keystore import coordinator_boxes, generate, member_boxes
from fedjet.privacy.accounting import epsilon_for
from fedjet.runner.replay import ReplayConfig, verify_recording
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS

CLOUDS = ("aws", "gcp")
NOISE, RATE, DELTA, STEPS = 1.0, 0.01, 1e-5, 4
BUDGET = epsilon_for(NOISE, RATE, 2 * STEPS, DELTA)  # two updates of 4 steps each, and no more
# (cloud, seq, base, DP steps claimed in all): gcp's one update claims 12 steps, over the budget
UPDATES = [("aws", 1, 0, STEPS), ("gcp", 1, 0, 3 * STEPS), ("aws", 2, 1, 2 * STEPS)]


def spec(job: str) -> JobSpec:
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), codec="dense", strategy=StrategyConfig(name="async"),
                       train=TrainConfig(local_steps=STEPS), dp=f"epsilon={BUDGET},delta={DELTA},clip=1.0",
                       stop=StopConfig(max_updates=2))  # fmt: skip
    return JobSpec(config=config, model_config={})


def envelope(keys, job: str, cloud: str, seq: int, base: int, steps: int) -> bytes:
    claim = DPClaim(epsilon=epsilon_for(NOISE, RATE, steps, DELTA), delta=DELTA, noise=NOISE, sample_rate=RATE,
                    clip=1.0, steps=steps)  # fmt: skip
    header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=seq, base_version=base, samples=8, loss=2.0, dp=claim)
    delta = {n: torch.full(t.shape, 1e-3) for n, t in WEIGHTS.items()}
    return crypto.seal_update(encode_update(Update(header, delta), CodecSpec.parse("dense")), member_boxes(keys, cloud))


class Unchecked(PrivacyBudget):
    """The budget of a coordinator that does not keep the job's privacy promise: every claim
    is taken (and counted)."""

    def charge(self, header, job) -> None:
        if header.dp is not None:
            self.spend(header.cloud, header.dp.steps)


async def run(nats_url: str, keys, job: str, *, lying: bool = False) -> Coordinator:
    boxes = coordinator_boxes(keys, CLOUDS)
    coordinator = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec(job), boxes=boxes, idle_timeout_s=30))
    if lying:
        coordinator.budget = Unchecked()
    nc = await connect(nats_url, "clouds")
    try:
        task = asyncio.create_task(coordinator.run({n: t.clone() for n, t in WEIGHTS.items()}))
        await asyncio.wait_for(coordinator.serving.wait(), 30)
        for cloud, seq, base, steps in UPDATES:
            data = envelope(keys, job, cloud, seq, base, steps)
            await publish_blob(nc.jetstream(), JobSubjects(job).update(cloud), data, blob_id=f"{cloud}-{seq}",
                               max_payload=nc.max_payload)  # fmt: skip
        await asyncio.wait_for(task, 60)
    finally:
        await close_quietly(nc)
    return coordinator


def test_replay_and_live_refuse_the_same_over_budget_update_through_the_same_admission_call(
    nats_url, tmp_path, monkeypatch
):
    keys = tmp_path / "keys"
    generate(keys, CLOUDS)
    refused: list[tuple[str, int, str]] = []  # what Admission.check refused, live or in replay
    check = Admission.check

    def spied(self, update, *args, **kwargs):
        try:
            return check(self, update, *args, **kwargs)
        except FedjetError as e:
            refused.append((update.header.cloud, update.header.seq, f"{e.reason}: {e}"))
            raise

    monkeypatch.setattr(Admission, "check", spied)
    live = asyncio.run(run(nats_url, keys, "dplive"))
    assert live.ledger.rejected == {"PrivacyError": 1} and live.aggregator.version == 2
    assert [(cloud, seq) for cloud, seq, _ in refused] == [("gcp", 1)], refused
    live_reason = refused[0][2]
    assert "over the job's budget" in live_reason

    lying = asyncio.run(run(nats_url, keys, "dplying", lying=True))
    assert lying.ledger.rejected == {} and lying.aggregator.version == 2  # it took gcp's update
    assert len(refused) == 1

    def verify(job: str) -> dict:
        return verify_recording(ReplayConfig(nats_url=nats_url, job=job, keys=str(keys), verify=True, progress=False))

    assert verify("dplive").to_dict() == {"versions": 2, "mismatches": 0, "first_mismatch": None}
    assert len(refused) == 1  # aws's second update, 8 steps after 4, is re-admitted as it was live
    found = verify("dplying")
    assert found.versions == 2 and [m.version for m in found.mismatches] == [2], found.to_dict()
    assert found.mismatches[0].reason == live_reason
    assert refused == [("gcp", 1, live_reason)] * 2
