"""The live coordinator over a real nats-server: hostile traffic is counted, never fatal."""

from __future__ import annotations

import asyncio

import torch
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.crypto import COORDINATOR, Boxes, Identity
from fedjet.codecs.messages import Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.config.job import JobConfig, StopConfig, TrainConfig
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS

CLOUDS = ("aws", "gcp")


def make_parties():
    ids = {n: Identity.generate(n) for n in (COORDINATOR, *CLOUDS)}
    coord = Boxes(ids[COORDINATOR], {c: ids[c].public for c in CLOUDS})
    members = {c: Boxes(ids[c], {COORDINATOR: ids[COORDINATOR].public}) for c in CLOUDS}
    return coord, members


def sealed_update(boxes: Boxes, cloud: str, seq: int, value: float) -> bytes:
    header = UpdateHeader(job="live", cloud=cloud, worker="0", seq=seq, base_version=0, samples=10, loss=2.0)
    tensors = {n: torch.full(t.shape, value) for n, t in WEIGHTS.items()}
    return crypto.seal_update(encode_update(Update(header, tensors), CodecSpec.parse("topk:0.5+int8")), boxes)


async def attack_then_behave(nc, coordinator: Coordinator, subjects: JobSubjects, members) -> None:
    """Junk, a swapped cloud, a replayed and a second aws update around one good update from each cloud."""
    js = nc.jetstream()
    await asyncio.wait_for(coordinator.serving.wait(), 30)  # the streams and v0 exist

    async def send(subject_cloud: str, data: bytes, blob_id: str) -> None:
        await publish_blob(js, subjects.update(subject_cloud), data, blob_id=blob_id, max_payload=nc.max_payload)

    await js.publish(subjects.update("aws"), b"no chunk headers at all")
    await send("aws", b"\x00garbage", "g1")
    await send("gcp", sealed_update(members["aws"], "aws", 5, 1.0), "moved")  # swapped cloud
    await send("aws", sealed_update(members["aws"], "aws", 10, 0.5), "a10")
    await send("aws", sealed_update(members["aws"], "aws", 10, 9.0), "replay")
    await send("aws", sealed_update(members["aws"], "aws", 11, 9.0), "a11")
    await send("gcp", sealed_update(members["gcp"], "gcp", 3, -0.5), "g3")


def test_hostile_traffic_is_rejected_counted_and_the_round_still_completes(nats_url):
    coord, members = make_parties()
    job = JobConfig(
        job="live", clouds=CLOUDS, observers=(), codec="topk:0.5+int8",
        train=TrainConfig(local_steps=1), stop=StopConfig(rounds=1),
    )  # fmt: skip
    spec = JobSpec(config=job, model_config={})
    coordinator = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec, boxes=coord, idle_timeout_s=30))
    subjects = JobSubjects("live")

    async def scenario():
        nc = await connect(nats_url, "attacker")
        try:
            task = asyncio.create_task(coordinator.run(dict(WEIGHTS)))
            await attack_then_behave(nc, coordinator, subjects, members)
            ledger = await asyncio.wait_for(task, 60)
            info = await nc.jetstream().consumer_info(subjects.update_stream, subjects.coordinator_durable)
        finally:
            await close_quietly(nc)
        return ledger, info

    with capture_logs(processors=[merge_contextvars]) as logs:
        ledger, info = asyncio.run(scenario())
    assert ledger.applied == 2
    assert ledger.rejected == {
        "BlobError": 1,
        "DecodeError": 1,
        "AuthenticationError": 1,
        "ReplayError": 1,
        "StaleUpdateError": 1,  # aws already reported in this round
    }
    agg = coordinator.aggregator
    assert agg.version == 1 and coordinator.last_head.final
    # FedAvg of +0.5 and -0.5 (equal samples, top-50% of a constant keeps exact values) -> unchanged
    assert torch.allclose(agg.weights["w"], WEIGHTS["w"], atol=0.01)
    assert info.num_ack_pending == 0 and info.num_pending == 0  # every message was acked

    # the canonical events, each with its unit of work bound once (job from the service,
    # cloud per update, version per publication)
    applied = [e for e in logs if e["event"] == "update_applied"]
    assert [(e["cloud"], e["version"], e["job"]) for e in applied] == [("aws", 1, "live"), ("gcp", 1, "live")]
    rejected = [e for e in logs if e["event"] == "update_rejected"]
    assert sorted(e["reason"] for e in rejected) == sorted(ledger.rejected) and all(
        e["job"] == "live" for e in rejected
    )
    published = [e for e in logs if e["event"] == "version_published"]
    assert [(e["version"], e["final"], e["job"]) for e in published] == [(0, False, "live"), (1, True, "live")]
