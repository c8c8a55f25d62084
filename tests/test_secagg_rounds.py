"""Secure aggregation through a real nats-server: the coordinator service runs the rounds,
three members (the worker's own ``SecureMember``) mask their updates.

What is checked: the new global equals plain FedAvg of the same updates (fixed-point
tolerance); what the coordinator received from a member does not correlate with its update;
a member that drops after sharing keys is unmasked away and the round completes from the
other two; below the threshold the attempt aborts (counted) and the next one succeeds;
forged and replayed messages are counted and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.secagg import SecAggLink, secagg_max_bytes
from fedjet.codecs.crypto import COORDINATOR, open_secagg
from fedjet.codecs.flat import flatten
from fedjet.codecs.messages import UpdateHeader
from fedjet.config.job import JobConfig, StopConfig, StrategyConfig, TrainConfig
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.secagg import Transcript
from fedjet.secagg.steps import UP, Step
from fedjet.spec import JobSpec
from fedjet.worker.secure import SecureMember
from tests.conftest import make_parties, until

CLOUDS = ("aws", "azure", "gcp")
WEIGHTS = {"w": torch.ones(40, 25), "b": torch.zeros(25)}
SAMPLES = {"aws": 30, "azure": 10, "gcp": 20}


def spec(job: str, secure: str = "threshold=2,timeout=2") -> JobSpec:
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), secure_agg=secure,
                       train=TrainConfig(local_steps=1), stop=StopConfig(rounds=1))  # fmt: skip
    return JobSpec(config=config, model_config={})


def updates(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {c: {n: 0.01 * torch.randn(t.shape, generator=gen) for n, t in WEIGHTS.items()} for c in CLOUDS}


class Dropping:
    """A link that loses every step after ``kind``, in the first ``rounds`` rounds it joins."""

    def __init__(self, link: SecAggLink, kind: str, rounds: int = 1) -> None:
        self._link, self._kind, self._rounds, self._seen = link, kind, rounds, []

    def __getattr__(self, name):
        return getattr(self._link, name)

    async def send(self, to: str, step: Step) -> int:
        if step.round_id not in self._seen:
            self._seen.append(step.round_id)
        late = UP.index(step.kind) > UP.index(self._kind)
        if late and self._seen.index(step.round_id) < self._rounds:
            return 0
        return await self._link.send(to, step)


async def joined(nc, job: str, cloud: str, members, config, links: list, wrap=None) -> SecureMember:
    """A started link for ``cloud`` (kept in ``links`` to stop later) and its member."""
    link = SecAggLink(nc.jetstream(), JobSubjects(job), members[cloud], peers=(COORDINATOR,),
                      max_bytes=secagg_max_bytes(3, 1025), max_payload=nc.max_payload)  # fmt: skip
    await link.start()
    links.append(link)
    return SecureMember(wrap(link) if wrap else link, job=job, cloud=cloud, clouds=CLOUDS, config=config,
                        signing_key=members[cloud].me.sign,
                        verify_keys={c: members[c].me.sign.verify_key for c in CLOUDS})  # fmt: skip


@dataclass
class Running:
    """A live coordinator of a secure job, the members' connection, and their links."""

    coordinator: Coordinator
    task: asyncio.Task[Any]
    nc: Any
    links: list[SecAggLink] = field(default_factory=list)


@contextlib.asynccontextmanager
async def running(nats_url: str, job_spec: JobSpec, coord) -> AsyncIterator[Running]:
    """Start the coordinator and wait until it serves; afterwards stop the members' links,
    close their connection, and stop the coordinator if the job did not end by itself."""
    nc = await connect(nats_url, "members")
    coordinator = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=job_spec, boxes=coord, idle_timeout_s=60))
    run = Running(coordinator, asyncio.create_task(coordinator.run({n: t.clone() for n, t in WEIGHTS.items()})), nc)
    try:
        await asyncio.wait_for(coordinator.serving.wait(), 30)
        yield run
    finally:
        for link in run.links:
            await link.stop()
        await close_quietly(nc)
        if not run.task.done():
            coordinator.stop()
            await asyncio.wait_for(run.task, 30)


async def run_job(nats_url, job: str, *, droppers: dict[str, tuple[str, int]] | None = None, junk=None):
    coord, members = make_parties(CLOUDS)
    job_spec = spec(job)
    config = job_spec.config.secure_agg_config
    async with running(nats_url, job_spec, coord) as run:
        coordinator, nc, links = run.coordinator, run.nc, run.links
        js = nc.jetstream()

        def newer() -> bool:
            return coordinator.aggregator is not None and coordinator.aggregator.version > 0

        head = coordinator.last_head
        work = []
        for cloud in CLOUDS:
            kind, rounds = (droppers or {}).get(cloud, (None, 0))
            wrap = (lambda link, kind=kind, rounds=rounds: Dropping(link, kind, rounds)) if kind else None
            member = await joined(nc, job, cloud, members, config, links, wrap)
            header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=1, base_version=0,
                                  samples=SAMPLES[cloud], loss=2.0 + CLOUDS.index(cloud))  # fmt: skip
            work.append(member.contribute(updates()[cloud], header, head.hash, newer))
        if junk is not None:
            await junk(js, nc, members)
        done = await asyncio.wait_for(asyncio.gather(*work), 60)
        await asyncio.wait_for(run.task, 60)
        transcript = await read_transcript(js, job, coord, coordinator)
    return coordinator, dict(zip(CLOUDS, done, strict=True)), transcript


async def read_transcript(js, job, coord, coordinator) -> Transcript:
    subjects = JobSubjects(job)
    msg = await js.get_last_msg(subjects.secagg_stream, subjects.secagg_transcript)  # one chunk: a small model
    _, data = open_secagg(msg.data, coord, 1 << 24, senders={COORDINATOR})
    return Transcript.from_wire(msgpack.unpackb(data, raw=False))


def fedavg(survivors: tuple[str, ...]) -> dict[str, torch.Tensor]:
    u, total = updates(), sum(SAMPLES[c] for c in survivors)
    return {n: t + sum(SAMPLES[c] / total * u[c][n] for c in survivors) for n, t in WEIGHTS.items()}


def assert_close_to_fedavg(coordinator, survivors):
    expected = fedavg(survivors)
    for name, tensor in coordinator.aggregator.weights.items():
        assert torch.allclose(tensor, expected[name], atol=1e-5), name


def test_three_clouds_all_report_the_global_is_their_fedavg_and_no_masked_input_reveals_its_update(nats_url):
    coordinator, done, transcript = asyncio.run(run_job(nats_url, "sa3"))
    assert done == {c: True for c in CLOUDS}
    assert coordinator.aggregator.version == 1
    assert_close_to_fedavg(coordinator, CLOUDS)
    record = coordinator.ledger
    assert record.applied == 3 and not record.rejected
    for masked in transcript.masked:  # what the coordinator held of each cloud
        y = np.frombuffer(masked.y, dtype="<u8").astype(np.float64)
        x = flatten(updates()[masked.member]).astype(np.float64)
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.15  # 1025 coordinates: 4.8 sigma
        assert abs(y.mean() / 2**64 - 0.5) < 0.05  # spread over the whole ring


def test_a_cloud_that_drops_after_sharing_keys_is_unmasked_away(nats_url):
    coordinator, done, transcript = asyncio.run(run_job(nats_url, "sadrop", droppers={"gcp": ("shares", 99)}))
    assert done["aws"] and done["azure"] and not done["gcp"]
    assert coordinator.aggregator.version == 1
    assert transcript.request.dropped == ("gcp",)
    assert_close_to_fedavg(coordinator, ("aws", "azure"))


def test_a_cloud_killed_after_it_masked_stays_in_the_sum_the_other_two_unmask(nats_url):
    coordinator, done, transcript = asyncio.run(run_job(nats_url, "samasked", droppers={"gcp": ("masked", 99)}))
    assert done["aws"] and done["azure"]
    assert coordinator.aggregator.version == 1
    assert transcript.request.survivors == CLOUDS and len(transcript.reveals) == 2
    assert_close_to_fedavg(coordinator, CLOUDS)


def test_below_the_threshold_the_round_aborts_cleanly_and_the_next_attempt_completes(nats_url):
    droppers = {"azure": ("shares", 1), "gcp": ("shares", 1)}  # only in their first round
    coordinator, done, _ = asyncio.run(run_job(nats_url, "saabort", droppers=droppers))
    assert done == {c: True for c in CLOUDS}
    assert coordinator.ledger.rejected.get("SecAggAbort") == 1
    assert coordinator.aggregator.version == 1
    assert_close_to_fedavg(coordinator, CLOUDS)


def test_forged_and_replayed_steps_are_counted_and_change_nothing(nats_url):
    async def junk(js, nc, members):
        subjects = JobSubjects("sajunk")
        await publish_blob(js, subjects.secagg_up("aws"), b"FJS\x01\x03aws" + b"\x00" * 80, blob_id="forged",
                           max_payload=nc.max_payload)  # fmt: skip
        await publish_blob(js, subjects.secagg_up("aws"), b"not even an envelope", blob_id="junk",
                           max_payload=nc.max_payload)  # fmt: skip

    coordinator, done, _ = asyncio.run(run_job(nats_url, "sajunk", junk=junk))
    assert done == {c: True for c in CLOUDS}
    assert_close_to_fedavg(coordinator, CLOUDS)
    rejected = coordinator.ledger.rejected
    assert rejected.get("AuthenticationError", 0) + rejected.get("DecodeError", 0) == 2


@pytest.mark.parametrize("bad", ["threshold=1", "threshold=4", "density=0", "bogus=1", "timeout=-1"])
def test_bad_secure_agg_settings_are_refused_up_front(bad):
    from fedjet.errors import ConfigError

    with pytest.raises(ConfigError, match="secure-agg"):
        spec("bad", bad)


@pytest.mark.parametrize(
    "strategy, why",
    [("dynamic", "formula 2"), ("async", "sum of one"), (StrategyConfig(name="fedbuff", buffer_size=1), "buffer-size")],
)
def test_strategies_secure_aggregation_cannot_serve_are_refused_with_the_reason(strategy, why):
    from fedjet.errors import ConfigError

    strategy = strategy if isinstance(strategy, StrategyConfig) else StrategyConfig(name=strategy)
    with pytest.raises(ConfigError, match=why):
        JobConfig(job="bad", clouds=CLOUDS, secure_agg="on", strategy=strategy)


def test_fedbuff_buffers_are_masked_and_a_stale_update_is_weighed_by_its_staleness(nats_url):
    """Buffer of 2 of 3 clouds: aws and azure fill version 1's buffer; gcp, still on version 0,
    joins version 2's buffer with aws's next update, weighed s(1) = 2^-0.5 against s(0) = 1."""
    job = "safedbuff"
    coord, members = make_parties(CLOUDS)
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), secure_agg="threshold=2,timeout=2",
                       strategy=StrategyConfig(name="fedbuff", buffer_size=2),
                       train=TrainConfig(local_steps=1), stop=StopConfig(rounds=2))  # fmt: skip
    job_spec = JobSpec(config=config, model_config={})
    u = updates()
    later = updates(seed=1)["aws"]

    async def scenario():
        async with running(nats_url, job_spec, coord) as run:
            coordinator = run.coordinator

            def version() -> int:
                return coordinator.aggregator.version if coordinator.aggregator is not None else 0

            async def member(cloud: str) -> SecureMember:
                return await joined(run.nc, job, cloud, members, job_spec.config.secure_agg_config, run.links)

            def header(cloud: str, seq: int, base: int) -> UpdateHeader:
                return UpdateHeader(job=job, cloud=cloud, worker="0", seq=seq, base_version=base, samples=10, loss=2.0)

            v0_hash = coordinator.last_head.hash
            aws, azure, gcp = await member("aws"), await member("azure"), await member("gcp")
            first = await asyncio.wait_for(asyncio.gather(
                aws.contribute(u["aws"], header("aws", 1, 0), v0_hash, lambda: version() > 1, later_rounds=True),
                azure.contribute(u["azure"], header("azure", 1, 0), v0_hash, lambda: version() > 1, later_rounds=True),
            ), 60)  # fmt: skip
            assert first == [True, True]
            await until(lambda: version() >= 1, "version 1 after the members revealed")
            v1 = {n: t.clone() for n, t in coordinator.aggregator.weights.items()}
            v1_hash = coordinator.last_head.hash
            second = await asyncio.wait_for(asyncio.gather(
                gcp.contribute(u["gcp"], header("gcp", 1, 0), v0_hash, lambda: version() > 2, later_rounds=True),
                aws.contribute(later, header("aws", 2, 1), v1_hash, lambda: version() > 2, later_rounds=True),
            ), 60)  # fmt: skip
            await asyncio.wait_for(run.task, 60)
        return coordinator, v1, second

    coordinator, v1, second = asyncio.run(scenario())
    assert second == [True, True] and coordinator.aggregator.version == 2
    for name, w0 in WEIGHTS.items():
        assert torch.allclose(v1[name], w0 + (u["aws"][name] + u["azure"][name]) / 2, atol=1e-5)
        expected = v1[name] + (2**-0.5 * u["gcp"][name] + later[name]) / 2
        assert torch.allclose(coordinator.aggregator.weights[name], expected, atol=1e-5), name


def test_members_move_to_the_round_a_restarted_coordinator_opens(nats_url):
    """The coordinator stops with a round open; the same command restarts it, and it opens a new
    attempt on the same version. Members that saw the old round take the new one: one version,
    the FedAvg of all three."""
    job = "sarestart"
    coord, members = make_parties(CLOUDS)
    job_spec = spec(job)

    async def scenario():
        nc = await connect(nats_url, "members")
        first = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=job_spec, boxes=coord, idle_timeout_s=60))
        task = asyncio.create_task(first.run({n: t.clone() for n, t in WEIGHTS.items()}))
        links, secure = [], []
        try:
            await asyncio.wait_for(first.serving.wait(), 30)
            for cloud in CLOUDS:
                secure.append(await joined(nc, job, cloud, members, job_spec.config.secure_agg_config, links))
            await until(lambda: all(link.waiting for link in links), "the first round's open reaching every member")
            first.stop()
            await asyncio.wait_for(task, 30)
            second = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=job_spec, boxes=coord, idle_timeout_s=60))
            task = asyncio.create_task(second.run({n: t.clone() for n, t in WEIGHTS.items()}))
            await asyncio.wait_for(second.serving.wait(), 30)
            head = second.last_head

            def newer() -> bool:
                return second.aggregator is not None and second.aggregator.version > 0

            work = [
                m.contribute(updates()[c], UpdateHeader(job=job, cloud=c, worker="0", seq=1, base_version=0,
                                                        samples=SAMPLES[c], loss=2.0), head.hash, newer)
                for m, c in zip(secure, CLOUDS, strict=True)
            ]  # fmt: skip
            done = await asyncio.wait_for(asyncio.gather(*work), 60)
            await asyncio.wait_for(task, 60)
        finally:
            for link in links:
                await link.stop()
            await close_quietly(nc)
            if not task.done():
                task.cancel()
        return second, done

    second, done = asyncio.run(scenario())
    assert done == [True, True, True]
    assert second.aggregator.version == 1
    # each member took the old round's open first; its advertisement for it is counted as stale
    # when the new coordinator already listens, and lost with the old one when not
    assert set(second.ledger.rejected) <= {"StaleRoundError"}
    assert_close_to_fedavg(second, CLOUDS)
