"""Keys and counters: every authenticated sequence number is spent for good (a rejected update
cannot come back after a restart), worker ids per cloud are bounded so the record stays small,
and a coordinator's local state refuses a broker that hides its newest versions."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.crypto import MAX_WORKERS_PER_CLOUD, ReplayGuard
from fedjet.codecs.messages import MAX_HEAD_BYTES, Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.codecs.record import Progress
from fedjet.config.job import JobConfig, RoundConfig, StopConfig, TrainConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.local_state import LocalState, Published, check_not_behind
from fedjet.coordinator.record import Committed, Ledger
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.errors import ConfigError, ReplayError, ValidationError
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, make_parties, until_version

CLOUDS = ("aws", "gcp")
CODEC = "topk:0.5+int8"


def spec(job: str, rounds: int = 3, round_policy: RoundConfig | None = None) -> JobSpec:
    policy = round_policy or RoundConfig(late="carry")
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), codec=CODEC, round=policy,
                       train=TrainConfig(local_steps=1), stop=StopConfig(rounds=rounds))  # fmt: skip
    return JobSpec(config=config, model_config={})


def envelope(members, job: str, cloud: str, seq: int, base: int, worker: str = "0") -> bytes:
    header = UpdateHeader(job=job, cloud=cloud, worker=worker, seq=seq, base_version=base, samples=8, loss=2.0)
    tensors = {n: torch.full(t.shape, 0.001 * seq) for n, t in WEIGHTS.items()}
    return crypto.seal_update(encode_update(Update(header, tensors), CodecSpec.parse(CODEC)), members[cloud])


def test_the_record_spends_every_authenticated_sequence_once_everything_before_it_is_decided():
    ledger = Ledger()
    ledger.authenticated(5, "aws", "0", 10)  # applied below
    ledger.authenticated(6, "aws", "0", 11)  # rejected (say, aws already reported)
    ledger.authenticated(9, "aws", "0", 12)  # still waiting for the next round
    header = UpdateHeader(job="j", cloud="aws", worker="0", seq=10, base_version=0, samples=1, loss=1.0)
    gcp = UpdateHeader(job="j", cloud="gcp", worker="0", seq=3, base_version=0, samples=1, loss=1.0)
    batch = [Committed(h, staleness=0, stream_seq=s, wire_bytes=0, arrived=0.0) for h, s in ((header, 5), (gcp, 7))]
    ledger.applied_batch(batch)
    progress = ledger.record("fedavg", batch, waiting=[9], assignment={}, dp_steps={}).progress
    assert progress.guard == {"aws/0": 11, "gcp/0": 3}  # 11 was rejected but is spent; 12 is re-read
    assert progress.resume_from == 8 and progress.applied_through == 7


def restarted(nats_url, job: str, before: list, after: list, policy: RoundConfig | None = None):
    """Run a coordinator through ``before``, stop it, start it again and run ``after``; each
    step is ``(cloud, seq, base)`` to publish that update (the same bytes if sent twice) or
    ``("until", version)`` to wait for a version. Returns both coordinators."""
    coord, members = make_parties(CLOUDS)
    subjects, kept = JobSubjects(job), {}

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()

        async def play(service: Coordinator, steps: list) -> None:
            for n, step in enumerate(steps):
                if step[0] == "until":
                    await until_version(service, step[1])
                    continue
                cloud, seq, base = step
                data = kept.setdefault((cloud, seq), envelope(members, job, cloud, seq, base))
                await publish_blob(js, subjects.update(cloud), data, blob_id=f"{cloud}/{seq}/{n}/{id(steps)}",
                                   max_payload=nc.max_payload)  # fmt: skip

        async def start() -> tuple[Coordinator, asyncio.Task]:
            service = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec(job, 3, policy), boxes=coord))
            task = asyncio.create_task(service.run(dict(WEIGHTS)))
            await asyncio.wait_for(service.serving.wait(), 30)
            return service, task

        try:
            first, task = await start()
            await asyncio.wait_for(play(first, before), 60)
            first.stop()
            await asyncio.wait_for(task, 30)
            second, task = await start()
            await play(second, after)
            await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)
        return first, second

    return asyncio.run(scenario())


def test_a_rejected_update_replayed_after_a_restart_is_refused(nats_url):
    # aws 13 is refused: aws already reported in round 2; after the restart the broker
    # re-publishes the very same bytes (a carried late update?)
    before = [("aws", 10, 0), ("gcp", 3, 0), ("aws", 12, 1), ("aws", 13, 1), ("gcp", 4, 1), ("until", 2)]
    first, second = restarted(nats_url, "spent", before, [("aws", 13, 1), ("gcp", 5, 2), ("aws", 14, 2)])
    assert first.ledger.rejected == {"StaleUpdateError": 1}
    assert second.ledger.rejected == {"StaleUpdateError": 1, "ReplayError": 1}  # counts carry over
    assert second.aggregator.version == 3 and second.ledger.applied == 6


def test_a_late_update_rejected_after_the_last_applied_one_is_counted_once_across_a_restart(nats_url):
    """Round 2 closes at its deadline with aws alone; gcp's round-1 update arrives after aws's
    round-2 one and is dropped as late. Version 2's record counts it, yet it lies past
    ``applied_through``: the restarted coordinator must skip it, not judge (and count) it again."""
    policy = RoundConfig(late="drop", quorum=1, deadline_s=0.5)
    before = [("aws", 1, 0), ("until", 1), ("aws", 2, 1), ("gcp", 1, 0), ("until", 2)]  # gcp 1 is late
    first, second = restarted(nats_url, "late", before, [("aws", 3, 2), ("gcp", 2, 2)], policy)
    assert first.ledger.rejected == {"StaleUpdateError": 1}
    assert second.ledger.rejected == {"StaleUpdateError": 1}  # not judged (and counted) a second time
    assert second.aggregator.version == 3 and second.ledger.applied == 4


def test_progress_marks_everything_seen_but_waiting_as_decided():
    progress = Progress(applied_through=10, seen_through=20, waiting=(12, 15))
    assert progress.decided(3) and progress.decided(10) and progress.decided(11) and progress.decided(20)
    assert not progress.decided(12) and not progress.decided(15) and not progress.decided(21)
    assert not Progress(applied_through=10).decided(11)  # records of older coordinators: as before


def test_worker_ids_per_cloud_are_bounded_and_the_record_stays_far_below_the_head_limit():
    coord, members = make_parties(CLOUDS)
    admission, guard = Admission(spec("many"), coord), ReplayGuard()
    for n in range(MAX_WORKERS_PER_CLOUD):
        admission.open(envelope(members, "many", "aws", 1, 0, worker=f"w{n}"), "aws", guard)
    with pytest.raises(ValidationError, match="workers"):
        admission.open(envelope(members, "many", "aws", 1, 0, worker="one-too-many"), "aws", guard)
    with pytest.raises(ReplayError):
        admission.open(envelope(members, "many", "aws", 1, 0, worker="w0"), "aws", guard)
    admission.open(envelope(members, "many", "gcp", 1, 0, worker="w0"), "gcp", guard)  # another cloud's own
    names = {f"{c:x<64}/{'w' * 63}{n:x}": 2**62 for c in ("a", "b", "c", "d") for n in range(MAX_WORKERS_PER_CLOUD)}
    record = Ledger(guard=names).record("fedavg", [], waiting=[], assignment={}, dp_steps={})
    assert len(record.to_bytes()) < MAX_HEAD_BYTES // 8


def test_local_state_refuses_a_broker_that_hides_or_lost_the_newest_versions(tmp_path, nats_url):
    coord, members = make_parties(CLOUDS)
    subjects = JobSubjects("state")

    def service() -> Coordinator:
        config = CoordinatorConfig(nats_url=nats_url, spec=spec("state"), boxes=coord, state_dir=str(tmp_path))
        return Coordinator(config)

    async def run_until_serving(coordinator: Coordinator) -> None:
        task = asyncio.create_task(coordinator.run(dict(WEIGHTS)))
        await asyncio.wait_for(asyncio.wait([task, asyncio.ensure_future(coordinator.serving.wait())],
                                            return_when=asyncio.FIRST_COMPLETED), 30)  # fmt: skip
        if task.done():
            task.result()  # raises what stopped it
        coordinator.stop()
        await asyncio.wait_for(task, 30)

    async def scenario():
        nc = await connect(nats_url, "broker")
        js = nc.jetstream()
        try:
            first = service()
            task = asyncio.create_task(first.run(dict(WEIGHTS)))
            await asyncio.wait_for(first.serving.wait(), 30)
            for cloud in CLOUDS:
                data = envelope(members, "state", cloud, 1, 0)
                await publish_blob(js, subjects.update(cloud), data, blob_id=cloud, max_payload=nc.max_payload)
            await until_version(first, 1)
            first.stop()
            await asyncio.wait_for(task, 30)
            await run_until_serving(service())  # an honest restart goes on from version 1
            newest = await js.get_last_msg(subjects.global_stream, subjects.global_head)
            await js.delete_msg(subjects.global_stream, newest.seq)  # the broker hides version 1's head
            with pytest.raises(ConfigError, match="roll back"):
                await run_until_serving(service())
            await js.delete_stream(subjects.global_stream)  # ... or lost its store
            with pytest.raises(ConfigError, match="start the job over"):
                await run_until_serving(service())
        finally:
            await close_quietly(nc)

    asyncio.run(scenario())
    assert LocalState(tmp_path, "state").read().version == 1


def test_local_state_check_is_pure_and_monotonic():
    mine = Published(job="j", version=4, hash="a")
    check_not_behind(None, None)
    check_not_behind(mine, Published(job="j", version=4, hash="a"))
    check_not_behind(mine, Published(job="j", version=5, hash="b"))  # published, then killed before writing
    for found in (None, Published(job="j", version=3, hash="a"), Published(job="j", version=4, hash="b")):
        with pytest.raises(ConfigError):
            check_not_behind(mine, found)
