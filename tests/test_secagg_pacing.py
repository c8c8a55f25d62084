"""``--secure-agg --partition dynamic``: a secure round commits through the same path as a plain
batch, so the pacer hears each survivor's speed and the version's record moves work away from
the slow cloud. A real nats-server, the real coordinator and the workers' own ``SecureMember``s;
the members' headers claim their speed as a worker's would (tokens, compute seconds)."""

from __future__ import annotations

import asyncio

from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import UpdateHeader
from fedjet.config.job import JobConfig, PartitionConfig, StopConfig, TrainConfig
from fedjet.spec import JobSpec
from tests.conftest import make_parties
from tests.test_secagg_rounds import CLOUDS, SAMPLES, joined, running, updates

TRAIN = TrainConfig(local_steps=4, batch_size=2, seq_len=8)
TOKENS = TRAIN.local_steps * TRAIN.batch_size * TRAIN.seq_len  # each cloud did the work it was given
COMPUTE_S = {"aws": 0.5, "azure": 0.5, "gcp": 20.0}  # gcp took 40 times as long for it


def test_secure_rounds_feed_the_pacer_and_the_record_moves_steps_off_the_slow_cloud(nats_url):
    job = "sapace"
    coord, members = make_parties(CLOUDS)
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), secure_agg="threshold=2,timeout=2", train=TRAIN,
                       partition=PartitionConfig(scheme="dynamic"), stop=StopConfig(rounds=1))  # fmt: skip
    job_spec = JobSpec(config=config, model_config={})

    async def scenario():
        async with running(nats_url, job_spec, coord) as run:
            coordinator = run.coordinator
            follower = GlobalFollower(run.nc.jetstream(), JobSubjects(job), coord, Limits())
            before = follower.record(coordinator.last_head).assignment

            def newer() -> bool:
                return coordinator.aggregator is not None and coordinator.aggregator.version > 0

            work = []
            for cloud in CLOUDS:
                member = await joined(run.nc, job, cloud, members, config.secure_agg_config, run.links)
                header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=1, base_version=0, samples=SAMPLES[cloud],
                                      loss=2.0, tokens=TOKENS, compute_s=COMPUTE_S[cloud])  # fmt: skip
                work.append(member.contribute(updates()[cloud], header, coordinator.last_head.hash, newer))
            done = await asyncio.wait_for(asyncio.gather(*work), 60)
            await asyncio.wait_for(run.task, 60)
            return coordinator, done, before, follower.record(coordinator.last_head)

    coordinator, done, before, record = asyncio.run(scenario())
    assert done == [True, True, True] and coordinator.aggregator.version == 1
    assert record.secure is not None and record.secure.survivors == CLOUDS
    assert before == dict.fromkeys(CLOUDS, TRAIN.local_steps)
    after = record.assignment
    assert sum(after.values()) == TRAIN.local_steps * len(CLOUDS), after
    assert after["gcp"] < TRAIN.local_steps and after["gcp"] < min(after["aws"], after["azure"]), after
