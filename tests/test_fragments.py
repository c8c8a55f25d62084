"""Streaming fragments: the plan (pure), what a fragment round admits, and a real recorded run
with ``--fragments 4`` that learns, moves one fragment a version, and replays bit for bit."""

from __future__ import annotations

import itertools
import json
import uuid

import pytest
import torch

from fedjet.codecs.fragments import FragmentPlan, module_of, plan_fragments
from fedjet.codecs.messages import Update, UpdateHeader
from fedjet.config.job import JobConfig, ServerOptConfig, StrategyConfig, TrainConfig
from fedjet.coordinator.validate import to_contribution
from fedjet.errors import ConfigError, ValidationError
from fedjet.models.job_model import initial_job_model, spec_for
from tests.conftest import run_fedjet

PARTS = (("attn", 400), ("mlp", 800))
BLOCKS = {f"h.{i}.{part}.{kind}": size for i in range(6) for part, size in PARTS for kind in ("weight", "bias")}
SIZES = {"wte.weight": 1000, **BLOCKS, "ln_f.weight": 50, "ln_f.bias": 50}


def test_a_plan_covers_every_tensor_once_in_order_without_cutting_a_module():
    plan = plan_fragments(SIZES, 4)
    assert plan.count == 4
    assert [n for fragment in plan.fragments for n in fragment] == list(SIZES)  # every name once, in order
    for a, b in zip(plan.fragments, plan.fragments[1:], strict=False):
        assert module_of(a[-1]) != module_of(b[0])  # a cut lies between modules
    shares = [sum(SIZES[n] for n in fragment) / sum(SIZES.values()) for fragment in plan.fragments]
    assert max(shares) < 0.25 * 1.5 and min(shares) > 0.25 * 0.5, shares
    assert plan_fragments(SIZES, 4) == plan  # the same plan every time
    assert plan_fragments(SIZES, 1).fragments == (tuple(SIZES),)
    assert [plan.of_version(v) for v in range(6)] == [0, 1, 2, 3, 0, 1]  # round-robin


@pytest.mark.parametrize(("count", "local_steps", "rounds"), [(4, 20, 20), (4, 8, 8), (3, 10, 7), (2, 9, 40)])
def test_the_last_cycle_drains_so_every_fragment_syncs_at_the_end_with_the_same_steps(count, local_steps, rounds):
    plan = FragmentPlan(tuple((f"m{k}.weight",) for k in range(count)))
    steps = [plan.phase_steps(v, local_steps, rounds) for v in range(rounds)]
    base = local_steps // count
    assert sum(steps) == rounds * base and min(steps) >= 1  # the same compute, no empty phase
    assert steps[: rounds - count] == [base] * (rounds - count)  # a phase a round until the last cycle
    total = sum(steps)
    for k in range(count):  # the step at which fragment k was last sent, before the final version
        last_round = max(v for v in range(rounds) if plan.of_version(v) == k)
        assert total - sum(steps[: last_round + 1]) <= count - 1, (k, steps)


def test_no_drain_without_a_known_end_or_with_too_few_rounds():
    plan = FragmentPlan((("a.weight",), ("b.weight",), ("c.weight",)))
    assert {plan.phase_steps(v, 12, None) for v in range(30)} == {4}
    assert {plan.phase_steps(v, 12, 5) for v in range(5)} == {4}  # fewer than two cycles
    assert {FragmentPlan((("a.weight",),)).phase_steps(v, 12, 9) for v in range(9)} == {12}


def test_a_plan_refuses_empty_fragments_and_foreign_models():
    with pytest.raises(ConfigError, match="only 2 modules"):
        plan_fragments({"a.weight": 1, "a.bias": 1, "b.weight": 1}, 3)
    with pytest.raises(ConfigError, match="exactly one fragment"):
        FragmentPlan((("a",), ("a",)))
    with pytest.raises(ConfigError, match="does not fit"):
        plan_fragments(SIZES, 2).check_covers([*SIZES, "extra.weight"])
    assert FragmentPlan.from_wire(plan_fragments(SIZES, 3).to_wire()) == plan_fragments(SIZES, 3)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"strategy": StrategyConfig(name="async")}, "--strategy async"),
        ({"dp": "epsilon=8,delta=1e-5,clip=1"}, "--dp"),
        ({"strategy": StrategyConfig(server=ServerOptConfig(name="adam"))}, "--server-opt adam"),
        ({"codec": "lowrank:24+int4+down=lowrank:16+int4"}, "+down="),
    ],
)
def test_fragments_say_which_settings_they_do_not_run_with_yet(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("+", r"\+")):
        JobConfig(train=TrainConfig(fragments=4), codec=overrides.pop("codec", "dense"), **overrides)


def test_a_fragment_round_admits_its_fragment_only():
    """Round v takes fragment v mod F: another fragment's tensors, or the whole model, are refused."""
    job = JobConfig(job="frag", train=TrainConfig(fragments=4), codec="dense", model="tiny")
    spec = spec_for(job, initial_job_model(job))
    plan = spec.fragment_plan
    assert plan is not None and plan.count == 4
    weights = initial_job_model(job).exchanged()
    plan.check_covers(list(weights))

    def update(base: int, names) -> Update:
        header = UpdateHeader(job="frag", cloud="aws", worker="0", seq=1, base_version=base, samples=8, loss=2.0)
        return Update(header, {n: torch.zeros_like(weights[n]) for n in names})

    admitted = to_contribution(update(5, plan.names(1)), "aws", spec, "delta", weights)  # 5 mod 4 = 1
    assert set(admitted.tensors) == set(plan.names(1))
    with pytest.raises(ValidationError, match=r"tensors missing|unknown tensor"):
        to_contribution(update(5, plan.names(2)), "aws", spec, "delta", weights)
    with pytest.raises(ValidationError, match="unknown tensor"):
        to_contribution(update(5, list(weights)), "aws", spec, "delta", weights)
    with pytest.raises(ValidationError, match="missing"):
        to_contribution(update(5, plan.names(1)[:-1]), "aws", spec, "delta", weights)


@pytest.mark.e2e
def test_a_fragment_run_learns_sends_a_fragment_a_round_and_replays_bit_for_bit(tmp_path, data_dir):
    store, job, report = tmp_path / "store", f"frag-{uuid.uuid4().hex[:6]}", tmp_path / "report.json"
    flags = ["--local-steps", "8", "--batch-size", "4", "--seq-len", "64", "--eval-tokens", "2048"]
    args = ["up", "--job", job, "--rounds", "8", "--fragments", "4", "--codec", "dense", "--store", str(store)]
    done = run_fedjet(*args, "--data", str(data_dir), "--report", str(report), *flags, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = json.loads(report.read_text())["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 1.0
    model_bytes = 4 * sum(t.numel() for t in initial_job_model(JobConfig(model="tiny")).exchanged().values())
    for r in rounds[1:]:  # three clouds, each sending one of four fragments: well under one model each
        assert 0 < r["bytes_up"] < 0.5 * 3 * model_bytes, r
    verify = run_fedjet("replay", "--store", str(store), "--job", job, "--verify", "--no-progress", timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout.strip().splitlines()[-1]) == {
        "versions": 8,
        "mismatches": 0,
        "first_mismatch": None,
    }


def test_a_fragment_round_moves_its_fragment_only_and_keeps_the_other_tensors_themselves():
    """No copy of the tensors a round does not synchronise: the coordinator's memory per round is
    the fragment's; their server-optimizer state (Nesterov, per fragment) is left alone too."""
    from fedjet.coordinator.aggregate import Contribution
    from fedjet.coordinator.strategies import Aggregator, Applied

    weights = {"a.weight": torch.ones(4), "b.weight": torch.ones(4)}
    strategy = StrategyConfig(name="fedavg", server=ServerOptConfig(name="nesterov", lr=0.7))
    aggregator = Aggregator(strategy, dict(weights), clouds=2)
    for cloud in ("aws", "gcp"):
        part = Contribution(cloud, 0, 8, 2.0, {"a.weight": torch.full((4,), 0.5)})
        aggregator.apply([Applied(part, 0)])
    assert aggregator.weights["b.weight"] is weights["b.weight"]
    assert not torch.equal(aggregator.weights["a.weight"], weights["a.weight"])
    assert set(aggregator.optimizer.state) == {"a.weight"}


@pytest.mark.e2e
def test_bench_fragments_prints_one_object_per_f_from_a_real_coordinator():
    done = run_fedjet(
        "bench", "fragments", "--params", "2000000", "--fragments", "1,2", "--compute-s", "1", "--json", timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["fragments"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"fragments", "model_mb", "coordinator_peak_rss_mb", "peak_up_mb_s"}
        assert r["coordinator_peak_rss_mb"] >= r["coordinator_rss_before_mb"] > r["model_mb"] > 0
        assert 0 < r["peak_up_mb_s"] * 1e6 <= 3 * r["model_mb"] * 1e6 * 1.2  # never more than was sent


def test_a_live_fragment_round_applies_the_right_fragment_and_counts_every_refusal(nats_url):
    """A real coordinator, ``--fragments 2``, round 0 (fragment 0): aws's fragment-0 update is
    applied; gcp's of the wrong fragment, an update on gcp's subject claiming aws, and aws's
    earlier sequence number sent after its later one are refused, each counted by its reason."""
    import asyncio

    from fedjet.broker.blobs import publish_blob
    from fedjet.broker.jetstream import close_quietly, connect
    from fedjet.broker.subjects import JobSubjects
    from fedjet.codecs import crypto
    from fedjet.codecs.messages import encode_update
    from fedjet.codecs.pipeline import CodecSpec
    from fedjet.config.job import RoundConfig, StopConfig
    from fedjet.coordinator.service import Coordinator, CoordinatorConfig
    from tests.conftest import make_parties

    clouds = ("aws", "gcp", "azure")
    coord, members = make_parties(clouds)
    job = JobConfig(
        job="fraglive", clouds=clouds, observers=(), codec="dense", model="tiny", stop=StopConfig(rounds=1),
        train=TrainConfig(fragments=2), round=RoundConfig(quorum=1, deadline_s=3.0),
    )  # fmt: skip
    jm = initial_job_model(job)
    spec, weights = spec_for(job, jm), jm.exchanged()
    plan = spec.fragment_plan
    service = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec, boxes=coord))
    subjects = JobSubjects("fraglive")

    def sealed(sender: str, claims: str, seq: int, fragment: int) -> bytes:
        header = UpdateHeader(job="fraglive", cloud=claims, worker="0", seq=seq, base_version=0, samples=8, loss=2.0)
        delta = {n: torch.full_like(weights[n], 1e-3) for n in plan.names(fragment)}
        return crypto.seal_update(encode_update(Update(header, delta), CodecSpec.parse("dense")), members[sender])

    async def scenario() -> None:
        nc = await connect(nats_url, "fragment-clouds")
        js = nc.jetstream()
        try:
            task = asyncio.create_task(service.run(dict(weights)))
            await asyncio.wait_for(service.serving.wait(), 60)
            sends = [
                ("gcp", sealed("gcp", "gcp", 10, fragment=1)),  # the wrong fragment for round 0
                ("gcp", sealed("gcp", "aws", 11, fragment=0)),  # gcp's subject, claiming aws
                ("aws", sealed("aws", "aws", 20, fragment=0)),  # the right one
                ("aws", sealed("aws", "aws", 19, fragment=0)),  # an earlier seq after a later one
            ]
            for i, (subject_cloud, data) in enumerate(sends):
                await publish_blob(
                    js, subjects.update(subject_cloud), data, blob_id=f"b{i}", max_payload=nc.max_payload
                )
            await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)

    asyncio.run(scenario())
    assert service.aggregator.version == 1
    moved = {n for n in weights if not torch.equal(service.aggregator.weights[n], weights[n])}
    assert moved == set(plan.names(0))  # version 1 moved fragment 0, nothing else
    assert service.ledger.applied == 1
    rejected = service.ledger.rejected
    assert sum(rejected.values()) == 3 and rejected.get("ValidationError") == 1, rejected
    assert rejected.get("AuthenticationError", 0) + rejected.get("ReplayError", 0) == 2, rejected


def test_a_fragment_round_closes_at_its_deadline_and_the_late_fragment_is_dropped_and_counted(nats_url):
    """``--round-deadline 1 --quorum 2 --late drop``: round 0 closes with aws and gcp after the
    grace window; azure's fragment-0 update, arriving after it, is dropped and counted; round 1
    (fragment 1) then closes the same way."""
    import asyncio

    from fedjet.broker.blobs import publish_blob
    from fedjet.broker.jetstream import close_quietly, connect
    from fedjet.broker.subjects import JobSubjects
    from fedjet.codecs import crypto
    from fedjet.codecs.messages import encode_update
    from fedjet.codecs.pipeline import CodecSpec
    from fedjet.config.job import RoundConfig, StopConfig
    from fedjet.coordinator.service import Coordinator, CoordinatorConfig
    from tests.conftest import make_parties

    clouds = ("aws", "gcp", "azure")
    coord, members = make_parties(clouds)
    job = JobConfig(
        job="fraglate", clouds=clouds, observers=(), codec="dense", model="tiny", stop=StopConfig(rounds=2),
        train=TrainConfig(fragments=2), round=RoundConfig(quorum=2, deadline_s=1.0, late="drop"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--late carry"):
        JobConfig(train=TrainConfig(fragments=2), codec="dense", round=RoundConfig(late="carry"))
    jm = initial_job_model(job)
    spec, weights = spec_for(job, jm), jm.exchanged()
    plan = spec.fragment_plan
    service = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec, boxes=coord))
    subjects = JobSubjects("fraglate")

    def sealed(cloud: str, seq: int, base: int) -> bytes:
        header = UpdateHeader(job="fraglate", cloud=cloud, worker="0", seq=seq, base_version=base, samples=8, loss=2.0)
        delta = {n: torch.full_like(weights[n], 1e-3) for n in plan.names(plan.of_version(base))}
        return crypto.seal_update(encode_update(Update(header, delta), CodecSpec.parse("dense")), members[cloud])

    async def scenario() -> float:
        nc = await connect(nats_url, "fragment-clouds")
        js = nc.jetstream()

        async def send(cloud: str, seq: int, base: int) -> None:
            await publish_blob(js, subjects.update(cloud), sealed(cloud, seq, base), blob_id=f"{cloud}{seq}",
                               max_payload=nc.max_payload)  # fmt: skip

        try:
            task = asyncio.create_task(service.run(dict(weights)))
            await asyncio.wait_for(service.serving.wait(), 60)
            started = asyncio.get_running_loop().time()
            await send("aws", 1, 0)
            await send("gcp", 1, 0)
            while service.aggregator.version < 1:  # the grace window, then the quorum closes round 0
                await asyncio.sleep(0.05)
            closed_after = asyncio.get_running_loop().time() - started
            await send("azure", 1, 0)  # late: version 1 is out
            await send("aws", 2, 1)
            await send("gcp", 2, 1)
            await asyncio.wait_for(task, 60)
            return closed_after
        finally:
            await close_quietly(nc)

    closed_after = asyncio.run(scenario())
    assert closed_after >= 1.0  # not before the grace window
    assert service.aggregator.version == 2 and service.ledger.applied == 4
    assert service.ledger.rejected == {"StaleUpdateError": 1}


def test_the_drain_holds_each_short_phase_upload_to_the_runs_ordinary_cadence():
    """The drain's one-step rounds come back faster than ordinary ones: their uploads wait, so
    fragments leave no closer together than the run's ordinary phases sent them."""
    from fedjet.worker.streaming import UploadCadence

    cadence = UploadCadence(ordinary_steps=5)
    starts = []
    for steps, now in [(5, 0.0), (5, 1.2), (5, 2.5), (17, 7.0), (1, 7.3), (1, 7.6), (1, 9.0)]:
        starts.append(now + cadence.hold_s(steps, now=now))
    assert starts[:4] == [0.0, 1.2, 2.5, 7.0]  # ordinary and long phases send at once
    gaps = [b - a for a, b in itertools.pairwise(starts[3:])]
    assert gaps == pytest.approx([1.3, 1.3, 1.3])  # the last ordinary interval, never shorter
    late = UploadCadence(ordinary_steps=5)
    assert [late.hold_s(s, now=t) for s, t in [(5, 0.0), (5, 1.0), (1, 4.0)]] == [0.0, 0.0, 0.0]  # already later
