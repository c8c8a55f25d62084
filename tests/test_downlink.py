"""Lossy downlink with coordinator-side error feedback: the pure view algebra, and the view
chain over a real nats-server (workers get views, everyone else the true versions)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower, GlobalPublisher, LatestHead
from fedjet.codecs.crypto import COORDINATOR
from fedjet.codecs.downlink import apply_change, decode_view, next_view_frame, view_step
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHeader, GlobalVersion, encode_global
from fedjet.codecs.record import VersionRecord
from fedjet.codecs.tensors import weights_hash
from fedjet.config.codec import CodecSpec
from fedjet.errors import SchemaError
from tests.conftest import make_parties

CODEC = CodecSpec.parse("topk:0.1+int4+down")
RECORD = VersionRecord(strategy="fedavg")


def trajectory(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """True globals of a made-up run: each version moves every weight a little."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"w": torch.randn(3000, generator=gen), "b": torch.randn(7, 11, generator=gen)}
    out = [weights]
    for _ in range(steps):
        weights = {n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in weights.items()}
        out.append(weights)
    return out


def test_a_follower_rebuilds_the_coordinators_view_bit_for_bit():
    spec = CodecSpec.parse("topk:0.05:warmup=0.5/3+int2")
    truth = trajectory(6)
    view = follower_view = truth[0]
    for version, true in enumerate(truth[1:], start=1):
        header = GlobalHeader(job="j", version=version, hash=weights_hash(true), delta_from=version - 1)
        frame, view, digest = next_view_frame(true, view, spec, header)
        follower_view = decode_view(frame, Limits(), follower_view).tensors
        assert weights_hash(follower_view) == digest == weights_hash(view)
        assert digest != weights_hash(true)  # lossy: the view lags the true global


def test_the_residual_is_carried_so_a_still_global_is_reached():
    """Error feedback: with the true global held still, the view converges to it; without the
    residual (compressing each change alone) it would stay where the first lossy step left it."""
    truth = trajectory(1)
    target, view = truth[1], truth[0]
    start = sum(float((target[n] - view[n]).norm()) for n in target)
    for version in range(1, 40):
        _, view = view_step(target, view, CODEC.down, version)
    left = sum(float((target[n] - view[n]).norm()) for n in target)
    assert left < 0.01 * start


def test_apply_change_leaves_the_old_view_untouched():
    view = {"w": torch.zeros(5)}
    new = apply_change(view, {"w": torch.ones(5)})
    assert torch.equal(view["w"], torch.zeros(5)) and torch.equal(new["w"], torch.ones(5))


def test_a_true_global_frame_is_not_read_as_a_view():
    weights = {"w": torch.ones(4)}
    frame, _ = encode_global(GlobalVersion(GlobalHeader(job="j", version=1, hash="h"), weights))
    with pytest.raises(SchemaError):
        decode_view(bytes(frame), Limits(), weights)


def view_publisher(js, nc, subjects: JobSubjects, coord, members: list[str], *, view_every: int = 1) -> GlobalPublisher:
    return GlobalPublisher(
        js, subjects, coord, members, max_payload=nc.max_payload, snapshot_every=3, downlink=CODEC.down,
        view_every=view_every,
    )  # fmt: skip


def test_workers_follow_views_while_observers_replay_and_late_joiners_get_their_due(nats_url):
    """Five versions under +down: a worker fetching each one holds the signed view; a worker
    joining at the end walks back to version 0 (which it built itself); a follower without
    views gets the true global; a restarted publisher starts the chain again from the truth."""
    asyncio.run(_views_over_jetstream(nats_url))


async def _views_over_jetstream(url: str) -> None:
    subjects = JobSubjects("down")
    coord, members = make_parties(("aws",), ("eval",))
    nc = await connect(url, "test-downlink")
    try:
        js = nc.jetstream()
        await ensure_job_streams(js, subjects)
        publisher = view_publisher(js, nc, subjects, coord, [COORDINATOR, "aws", "eval"])
        limits = Limits()
        worker = GlobalFollower(js, subjects, members["aws"], limits, views=True)
        observer = GlobalFollower(js, subjects, members["eval"], limits)
        truth = trajectory(5, seed=1)
        worker.hold_local(0, truth[0])
        heads = []
        for version, weights in enumerate(truth):
            head = await publisher.publish(version, weights_hash(weights), weights, RECORD, final=False)
            heads.append(head)
            got = await worker.fetch(head)
            assert head.view is not None and weights_hash(got.tensors) == head.view.hash == got.header.hash
            seen = await observer.fetch(head)
            assert weights_hash(seen.tensors) == head.hash
        assert heads[0].view.hash == heads[0].hash and heads[3].view.base == 2  # no view snapshots
        late = GlobalFollower(js, subjects, members["aws"], limits, views=True)
        late.hold_local(0, truth[0])
        walked = await late.fetch(heads[-1])
        assert weights_hash(walked.tensors) == heads[-1].view.hash
        assert late.bytes_down < 2 * worker.bytes_down  # only the small view changes, no dense version

        restarted = view_publisher(js, nc, subjects, coord, [COORDINATOR, "aws", "eval"])
        restarted.resume(LatestHead(heads[-1], 0), truth[-1])
        moved = {n: t + 1 for n, t in truth[-1].items()}
        head = await restarted.publish(6, weights_hash(moved), moved, RECORD, final=True)
        assert head.view is not None and head.view.base == -1 and head.view.hash == head.hash
        assert weights_hash((await worker.fetch(head)).tensors) == head.hash
    finally:
        await close_quietly(nc)


def test_a_view_changed_every_third_version_costs_a_third_and_still_rebuilds(nats_url):
    """An asynchronous job's cadence: between changes a version's view is its predecessor's,
    with nothing to read; a worker that fetched each version, and one that walks the whole
    chain at the end, hold the signed view either way."""
    asyncio.run(_view_cadence(nats_url))


async def _view_cadence(url: str) -> None:
    subjects = JobSubjects("cadence")
    coord, members = make_parties(("aws",))
    nc = await connect(url, "test-cadence")
    try:
        js = nc.jetstream()
        await ensure_job_streams(js, subjects)

        every = view_publisher(js, nc, subjects, coord, [COORDINATOR, "aws"], view_every=3)
        each = view_publisher(js, nc, JobSubjects("cadence1"), coord, [COORDINATOR, "aws"])
        await ensure_job_streams(js, JobSubjects("cadence1"))
        limits = Limits()
        worker = GlobalFollower(js, subjects, members["aws"], limits, views=True)
        dense = GlobalFollower(js, JobSubjects("cadence1"), members["aws"], limits, views=True)
        truth = trajectory(9, seed=2)
        worker.hold_local(0, truth[0])
        dense.hold_local(0, truth[0])
        heads = []
        for version, weights in enumerate(truth):
            head = await every.publish(version, weights_hash(weights), weights, RECORD, final=False)
            heads.append(head)
            got = await worker.fetch(head)
            assert head.view is not None and weights_hash(got.tensors) == head.view.hash
            await dense.fetch(await each.publish(version, weights_hash(weights), weights, RECORD, final=False))
        changed = [h.version for h in heads if h.view is not None and h.view.blob_id]
        assert changed == [3, 6, 9]
        assert all(heads[v].view.hash == heads[v - 1].view.hash for v in (1, 2, 4, 5, 7, 8))
        assert worker.bytes_down < 0.5 * dense.bytes_down
        late = GlobalFollower(js, subjects, members["aws"], limits, views=True)
        late.hold_local(0, truth[0])
        assert weights_hash((await late.fetch(heads[-1])).tensors) == heads[-1].view.hash
    finally:
        await close_quietly(nc)
