"""Junk on the global subjects: a restarted coordinator and ``fedjet replay`` walk past heads
that do not verify, and followers skip foreign or forged chunks inside a version's range."""

from __future__ import annotations

import asyncio
import json

import msgpack
import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.codecs import crypto
from fedjet.codecs.crypto import COORDINATOR, Identity
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import (
    GlobalHead,
    GlobalHeader,
    GlobalVersion,
    encode_global,
)
from fedjet.codecs.record import VersionRecord
from fedjet.codecs.tensors import weights_hash
from fedjet.config.job import JobConfig, StopConfig, TrainConfig
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.keystore import coordinator_boxes, generate, member_boxes
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, make_parties, publish_part, run_fedjet, sealed_update, until_version

CLOUDS = ("aws", "gcp")


def coordinator(nats_url: str, coord, job: str, rounds: int) -> Coordinator:
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), codec="topk:0.5+int8",
                       train=TrainConfig(local_steps=1), stop=StopConfig(rounds=rounds))  # fmt: skip
    spec = JobSpec(config=config, model_config={})
    return Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec, boxes=coord, idle_timeout_s=30))


async def send_round(js, nc, members, job: str, round_: int) -> None:
    for cloud in CLOUDS:
        envelope = sealed_update(members[cloud], job, cloud, round_, round_ - 1, value=0.01 * round_,
                                 codec="topk:0.5+int8")  # fmt: skip
        subject = JobSubjects(job).update(cloud)
        await publish_blob(js, subject, envelope, blob_id=f"{cloud}/{round_}", max_payload=nc.max_payload)


async def publish_junk_heads(js, job: str) -> None:
    """What anyone who may publish on the head subject can send: bytes, an unsigned head, a head
    signed by someone else's key, and messages under the ids the coordinator's heads would take
    if those were predictable (JetStream would drop the real heads as duplicates)."""
    subject = JobSubjects(job).global_head
    header = GlobalHeader(job=job, version=99, hash="0" * 64)
    forged = GlobalHead(header=header, first_seq=1, last_seq=1, size=1, sha256="0" * 64)
    await js.publish(subject, b"junk")
    await js.publish(subject, msgpack.packb({"hv": 1, "job": job, "version": 99}))
    await js.publish(subject, forged.sign(Identity.generate(COORDINATOR)))
    for version in range(4):  # taking the message ids a coordinator would use for its heads
        for final in (0, 1):
            await js.publish(subject, b"squatter", headers={"Nats-Msg-Id": f"{job}/h/{version}/{final}"})


def test_a_restarted_coordinator_walks_back_past_junk_heads(nats_url):
    coord, members = make_parties(CLOUDS)

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()
        try:
            first = coordinator(nats_url, coord, "junkhead", 2)
            task = asyncio.create_task(first.run(dict(WEIGHTS)))
            await asyncio.wait_for(first.serving.wait(), 30)
            await send_round(js, nc, members, "junkhead", 1)
            await until_version(first, 1)
            first.stop()
            await asyncio.wait_for(task, 60)
            await publish_junk_heads(js, "junkhead")
            second = coordinator(nats_url, coord, "junkhead", 2)
            task = asyncio.create_task(second.run(dict(WEIGHTS)))
            await asyncio.wait_for(second.serving.wait(), 30)
            resumed = second.aggregator.version
            await send_round(js, nc, members, "junkhead", 2)
            await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)
        return first, second, resumed

    _, second, resumed = asyncio.run(scenario())
    assert resumed == 1 and second.aggregator.version == 2 and second.last_head.final


def test_replay_verify_walks_past_junk_heads(tmp_path, nats_url):
    keys = tmp_path / "keys"
    generate(keys, CLOUDS)
    coord = coordinator_boxes(keys, CLOUDS)
    members = {c: member_boxes(keys, c) for c in CLOUDS}

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()
        try:
            service = coordinator(nats_url, coord, "junkreplay", 2)
            task = asyncio.create_task(service.run(dict(WEIGHTS)))
            await asyncio.wait_for(service.serving.wait(), 30)
            await publish_junk_heads(js, "junkreplay")
            for round_ in (1, 2):
                await send_round(js, nc, members, "junkreplay", round_)
                await until_version(service, round_)
                await publish_junk_heads(js, "junkreplay")
            await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)

    asyncio.run(scenario())
    result = run_fedjet("replay", "--nats", nats_url, "--job", "junkreplay", "--keys", str(keys), "--verify",
                        "--no-progress", timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "versions": 2,
        "mismatches": 0,
        "first_mismatch": None,
    }


def test_a_follower_reads_a_version_whose_range_holds_foreign_and_forged_chunks(nats_url):
    coord, members = make_parties(CLOUDS)
    subjects = JobSubjects("junkchunk")
    payload, header = encode_global(
        GlobalVersion(GlobalHeader(job="junkchunk", version=0, hash=weights_hash(WEIGHTS)), WEIGHTS)
    )
    sealed = crypto.seal_global_streamed(
        payload, VersionRecord(strategy="fedavg").to_bytes(), coord, [*CLOUDS, COORDINATOR]
    )
    blob = "junkchunk/g/0/abc"
    data = bytes(sealed.payload.read(0, len(sealed.payload)))
    assert len(data) > 2048 * 2  # three real chunks

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()
        try:
            await ensure_job_streams(js, subjects)
            subject = subjects.global_data
            first = await publish_part(js, subject, data, blob, 0, 3)
            await publish_part(js, subject, b"x" * len(data), "someone-else", 0, 3)  # a foreign blob id
            await publish_part(js, subject, b"x" * len(data), blob, 0, 3, msg_id="forged-0")  # part 0 again
            await publish_part(js, subject, data + b"x" * 4096, blob, 1, 3, msg_id="forged-1")  # another size
            await js.publish(subject, b"short", headers={"Fedjet-Blob": blob, "Fedjet-Part": "1/3",
                                                         "Fedjet-Size": str(len(data))})  # fmt: skip
            await publish_part(js, subject, data, blob, 1, 3)
            last = await publish_part(js, subject, data, blob, 2, 3)
            head = GlobalHead(
                header=header, first_seq=first.seq, last_seq=last.seq, size=len(data),
                sha256=crypto.digest(data), blob_id=blob, keys=sealed.keys, meta=sealed.meta, seal=crypto.STREAMED,
            )  # fmt: skip
            follower = GlobalFollower(js, subjects, members["aws"], Limits.for_model(1020, 2))
            return await follower.fetch(head)
        finally:
            await close_quietly(nc)

    version = asyncio.run(scenario())
    assert all(torch.equal(version.tensors[n], WEIGHTS[n]) for n in WEIGHTS)


def test_a_version_that_did_not_get_out_makes_the_next_one_whole_and_a_fragment_version_carries_its_part(nats_url):
    """A delta is only ever on a version that was announced: after a failed publish the next
    version is whole. A version that changed one tensor carries that tensor alone, whole."""
    from fedjet.channel.globals import GlobalPublisher
    from fedjet.errors import BrokerError

    coord, members = make_parties(CLOUDS)
    subjects = JobSubjects("outage")
    record = VersionRecord(strategy="fedavg")

    async def scenario():
        nc = await connect(nats_url, "coordinator")
        js = nc.jetstream(timeout=2.0)
        try:
            await ensure_job_streams(js, subjects)
            publisher = GlobalPublisher(
                js, subjects, coord, [*CLOUDS, COORDINATOR], max_payload=nc.max_payload, snapshot_every=100
            )
            versions = [dict(WEIGHTS)]
            for _ in range(3):  # each version moves one tensor, as a fragment round does
                moved = dict(versions[-1])
                moved["b"] = moved["b"] + 1.0
                versions.append(moved)
            heads = [await publisher.publish(0, weights_hash(versions[0]), versions[0], record, final=False)]
            heads.append(await publisher.publish(1, weights_hash(versions[1]), versions[1], record, final=False))
            await js.delete_stream(subjects.global_stream)  # the broker loses the stream: version 2 is not out
            try:
                await publisher.publish(2, weights_hash(versions[2]), versions[2], record, final=False)
                raise AssertionError("a version was published to a stream that is gone")
            except BrokerError:
                pass
            await ensure_job_streams(js, subjects)
            heads.append(await publisher.publish(3, weights_hash(versions[3]), versions[3], record, final=False))
            follower = GlobalFollower(js, subjects, members["aws"], Limits.for_model(1020, 2))
            fetched = await follower.fetch(heads[-1])
            return heads, fetched, versions
        finally:
            await close_quietly(nc)

    heads, fetched, versions = asyncio.run(scenario())
    assert [h.delta_from for h in heads] == [-1, 0, -1]  # 3 is whole: 2, its base, never got out
    assert heads[1].size < heads[0].size / 2  # version 1 carried the one tensor that moved
    assert weights_hash(fetched.tensors) == weights_hash(versions[3])
