"""Chunks from someone without a key, against a real coordinator and nats-server: one subject's
flood never costs another cloud its half-received update, what a subject holds unacked is
capped, and a coordinator that stops for idleness leaves the job resumable (never final)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.frame import Limits
from fedjet.config.job import JobConfig, StopConfig, TrainConfig
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, make_parties, publish_part, sealed_update

CLOUDS = ("aws", "gcp")


def coordinator(nats_url: str, coord, job: str, rounds: int, **config) -> Coordinator:
    job_config = JobConfig(job=job, clouds=CLOUDS, observers=(), codec="dense",
                           train=TrainConfig(local_steps=1), stop=StopConfig(rounds=rounds))  # fmt: skip
    spec = JobSpec(config=job_config, model_config={})
    return Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec, boxes=coord, **config))


def envelope(members, job: str, cloud: str, seq: int, base: int = 0) -> bytes:
    return sealed_update(members[cloud], job, cloud, seq, base)


def test_a_flood_on_one_subject_never_evicts_another_clouds_half_received_update(nats_url):
    coord, members = make_parties(CLOUDS)
    service = coordinator(nats_url, coord, "flood", 1, limits=Limits(max_frame_bytes=1 << 20), idle_timeout_s=20)
    subjects = JobSubjects("flood")

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()
        try:
            task = asyncio.create_task(service.run(dict(WEIGHTS)))
            await asyncio.wait_for(service.serving.wait(), 30)
            honest = envelope(members, "flood", "aws", 1)
            await publish_part(js, subjects.update("aws"), honest, "aws-1", 0, 2)  # half of aws's update ...
            junk = bytes(1 << 20)
            for n in range(5):  # ... then never-completing megabyte blobs on gcp's subject
                await publish_part(js, subjects.update("gcp"), junk, f"junk{n}", 0, 2)
            await publish_part(js, subjects.update("aws"), honest, "aws-1", 1, 2)  # ... and its other half
            gcp = envelope(members, "flood", "gcp", 1)
            await publish_blob(js, subjects.update("gcp"), gcp, blob_id="gcp-1", max_payload=nc.max_payload)
            return await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)

    with capture_logs() as logs:
        ledger = asyncio.run(scenario())
    assert ledger.applied == 2 and service.aggregator.version == 1
    assert ledger.rejected == {"BlobError": 4}
    assert {e["cloud"] for e in logs if e["event"] == "update_rejected"} == {"gcp"}


def test_held_chunks_are_capped_and_an_idle_coordinator_stops_without_finishing_the_job(nats_url):
    coord, members = make_parties(CLOUDS)
    subjects = JobSubjects("idle")
    junk = bytes(4096)

    async def first_run(js, nc) -> tuple[Coordinator, int]:
        service = coordinator(nats_url, coord, "idle", 2, idle_timeout_s=2)
        task = asyncio.create_task(service.run(dict(WEIGHTS)))
        await asyncio.wait_for(service.serving.wait(), 30)
        for cloud in CLOUDS:
            data = envelope(members, "idle", cloud, 1)
            await publish_blob(js, subjects.update(cloud), data, blob_id=f"{cloud}-1", max_payload=nc.max_payload)
        for n in range(300):  # one chunk index again and again, each under a fresh dedup id
            await publish_part(js, subjects.update("aws"), junk, "dup", 0, 2, msg_id=f"dup-{n}")
        await asyncio.wait_for(task, 60)  # returns once idle
        info = await js.consumer_info(subjects.update_stream, subjects.coordinator_durable)
        return service, info.num_ack_pending

    async def second_run(js, nc) -> Coordinator:
        service = coordinator(nats_url, coord, "idle", 2, idle_timeout_s=20)
        task = asyncio.create_task(service.run(dict(WEIGHTS)))
        await asyncio.wait_for(service.serving.wait(), 30)
        for cloud in CLOUDS:
            data = envelope(members, "idle", cloud, 2, base=1)
            await publish_blob(js, subjects.update(cloud), data, blob_id=f"{cloud}-2", max_payload=nc.max_payload)
        await asyncio.wait_for(task, 60)
        return service

    async def scenario():
        nc = await connect(nats_url, "clouds")
        try:
            first, pending = await first_run(nc.jetstream(), nc)
            second = await second_run(nc.jetstream(), nc)
        finally:
            await close_quietly(nc)
        return first, pending, second

    first, pending, second = asyncio.run(scenario())
    assert first.ledger.rejected == {"BlobError": 299}  # every repeat refused and acked at once
    assert pending <= 1  # only the first copy of that chunk is held
    assert first.aggregator.version == 1 and not first.last_head.final  # idleness never ends a job
    assert second.aggregator.version == 2 and second.last_head.final and second.ledger.applied == 4
