"""Central DP's sensitivity on a real coordinator: when a cloud's update does not arrive (a
quorum closes the round), the version moves by the others' clipped updates over the *expected*
count, so one cloud's presence changes it by at most clip / expected, as the accountant assumes."""

from __future__ import annotations

import asyncio

import torch
from structlog.testing import capture_logs

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.messages import Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.config.job import JobConfig, RoundConfig, StopConfig, StrategyConfig, TrainConfig
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.spec import JobSpec
from tests.conftest import make_parties

CLOUDS = ("aws", "gcp", "azure")
WEIGHTS = {"w": torch.ones(400, 25)}  # norm 100: --clip-update does not bind
CLIP, NUMEL = 0.5, 10_000


def test_a_round_without_one_cloud_divides_by_the_clouds_expected_not_by_those_that_came(nats_url):
    coord, members = make_parties(CLOUDS)
    config = JobConfig(
        job="cdp", clouds=CLOUDS, observers=(), codec="dense",
        strategy=StrategyConfig(name="fedavg", central_dp=f"clip={CLIP},noise=0.000001"),
        round=RoundConfig(quorum=2, deadline_s=1.0), train=TrainConfig(local_steps=1), stop=StopConfig(rounds=1),
    )  # fmt: skip
    service = Coordinator(
        CoordinatorConfig(nats_url=nats_url, spec=JobSpec(config=config, model_config={}), boxes=coord)
    )
    subjects = JobSubjects("cdp")

    async def scenario():
        nc = await connect(nats_url, "two-clouds")
        js = nc.jetstream()
        try:
            task = asyncio.create_task(service.run(dict(WEIGHTS)))
            await asyncio.wait_for(service.serving.wait(), 30)
            for cloud in ("aws", "gcp"):  # azure never reports: the quorum of 2 closes the round
                header = UpdateHeader(job="cdp", cloud=cloud, worker="0", seq=1, base_version=0, samples=8, loss=2.0)
                delta = {"w": torch.full((400, 25), 1.0)}  # norm 100, clipped to 0.5
                frame = encode_update(Update(header, delta), CodecSpec.parse("dense"))
                data = crypto.seal_update(frame, members[cloud])
                await publish_blob(js, subjects.update(cloud), data, blob_id=cloud, max_payload=nc.max_payload)
            await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)

    with capture_logs() as logged:
        asyncio.run(scenario())
    assert service.aggregator.version == 1
    closed = [e for e in logged if e["event"] == "round_closed_without"]  # the round log says who was missing
    assert [(e["version"], e["missing"], e["quorum"]) for e in closed] == [(1, ["azure"], 2)]
    moved = service.aggregator.weights["w"] - WEIGHTS["w"]
    each = CLIP / NUMEL**0.5  # one clipped update, per coordinate
    expected = 2 * each / len(CLOUDS)  # two clipped updates over the 3 the round expected (not over 2)
    assert torch.allclose(moved, torch.full_like(moved, expected), rtol=1e-3, atol=1e-6)
