"""The island policies in a worker's ``wait`` schedule, with the link, the versions and the
uplink played by fakes (the real thing runs in ``test_island.py``): what is trained and what is
sent while the hub is out of reach, and when the held work goes out."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fedjet.config.job import JobConfig, StrategyConfig, TrainConfig
from fedjet.metrics import WorkerMetrics
from fedjet.spec import JobSpec
from fedjet.worker import loops as loops_module
from fedjet.worker.loops import TrainingLoops
from fedjet.worker.train import StepsResult
from fedjet.worker.uplink import WorkerStats


class Link:
    """The hub answers ``up`` for the first probes in ``script``, then as the script says."""

    def __init__(self, script: list[bool]) -> None:
        self.script = script
        self.probes = 0

    async def link_up(self) -> bool:
        self.probes += 1
        return self.script.pop(0) if self.script else True


class Versions:
    """Version 0 at once; version 1 only once ``release`` is set; then the final marker."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.heads = [SimpleNamespace(version=0, final=False)]
        self.final = None

    @property
    def latest(self):
        return self.heads[-1]

    async def newer_than(self, version: int):
        if version < 0:
            return self.heads[0]
        await self.release.wait()
        if len(self.heads) == 1:
            self.heads.append(SimpleNamespace(version=1, final=False))
            return self.heads[-1]
        self.final = SimpleNamespace(version=1, final=True)
        return self.final

    async def fetch(self, head):
        return SimpleNamespace(tensors={}, header=None)

    def hold_local(self, version, tensors):
        pass

    def record(self, head):
        return SimpleNamespace(assignment={}, progress=SimpleNamespace(dp_steps={}))


class Sent:
    """The uplink: what was sent, on which base, with how many steps and how much compute."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float]] = []

    async def send_phase(self, base_version: int, steps: int, phase) -> None:
        self.calls.append((base_version, steps, phase.result.compute_s))

    def rebase_masked(self, head, tensors) -> None:
        pass


class Trainer:
    def __init__(self) -> None:
        self.steps = 0

    def train(self, steps: int) -> StepsResult:
        self.steps += steps
        return StepsResult(mean_loss=2.0, sequences=steps, tokens=10 * steps, compute_s=float(steps), wall_s=1.0)

    def weights(self):
        return {}

    def load(self, tensors) -> None:
        pass


def _loops(strategy: str, island: str | None, link: Link, *, max_steps: int | None = None):
    config = JobConfig(
        job="isl", strategy=StrategyConfig(name=strategy),
        train=TrainConfig(local_steps=2, island=island, island_max_steps=max_steps),
    )  # fmt: skip
    synchronous = strategy != "async" and strategy != "fedbuff"
    spec = JobSpec(
        config=config, model_config={}, synchronous=synchronous,
        delta_reference="last_send" if strategy == "fedbuff" else "base",
    )  # fmt: skip
    versions, trainer = Versions(), Trainer()
    sent = Sent()
    job = SimpleNamespace(
        spec=spec, trainer=trainer, private=None, data=SimpleNamespace(heldout=None),
        tracker=SimpleNamespace(rebase=lambda tensors, version: None),
    )  # fmt: skip
    loops = TrainingLoops(
        job, versions, sent, stats=WorkerStats("aws"), metrics=WorkerMetrics("aws"),
        stopping=asyncio.Event(), island=link,
    )  # fmt: skip
    return loops, versions, sent, trainer


async def _run_until(loops: TrainingLoops, versions: Versions, done) -> int:
    """Run until ``done()``, then release version 1 and the final marker; the steps trained
    before the release."""
    task = asyncio.create_task(loops.run())
    for _ in range(400):
        await asyncio.sleep(0.01)
        if done():
            break
    trained = loops.job.trainer.steps
    versions.release.set()
    await asyncio.wait_for(task, 10)
    return trained


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch):
    monkeypatch.setattr(loops_module, "ISLAND_CHECK_S", 0.01)


def test_accumulate_folds_the_phases_of_a_cut_into_one_update_sent_when_the_link_returns():
    # the first phase is sent with the link up; then three probes find it down (the first while
    # waiting for version 1, which ends the wait; the next two each start an island phase); then back
    link = Link([True, False, False, False, True])
    loops, versions, sent, _ = _loops("fedavg", None, link)
    assert loops.job.spec.island_policy == "accumulate"  # the default of the synchronous rules
    asyncio.run(_run_until(loops, versions, lambda: len(sent.calls) >= 2))
    first, held = sent.calls[:2]
    assert first == (0, 2, 2.0)
    assert held == (0, 4, 4.0)  # two island phases of 2 steps: one update on the old base, their compute
    assert loops.stats.island_steps == 4 and loops.stats.island_updates == 1


def test_queue_sends_every_phase_of_a_cut_and_stops_training_at_the_cap():
    link = Link([True] + [False] * 50)
    loops, versions, sent, _ = _loops("fedavg", "queue", link, max_steps=6)
    trained = asyncio.run(_run_until(loops, versions, lambda: link.probes > 20))
    on_version_0 = [call for call in sent.calls if call[0] == 0]
    assert on_version_0 == [(0, 2, 2.0)] * 4  # the phase before the cut, then each island phase as trained
    assert trained == 2 + 6  # the cap: nothing trained past --island-max-steps while cut off, 20 probes long
    assert loops.stats.island_updates == len(sent.calls) - 2  # every send after version 1's first phase too


def test_default_policies_follow_the_aggregation_rule():
    def policy(strategy: str) -> str:
        loops, *_ = _loops(strategy, None, Link([]))
        return loops.job.spec.island_policy

    assert [policy(s) for s in ("fedavg", "dynamic", "async", "fedbuff")] == [
        "accumulate", "accumulate", "accumulate", "queue",
    ]  # fmt: skip
    assert _loops("fedbuff", None, Link([]))[0].job.spec.island_max_steps == 20  # 10 phases of 2 steps


def test_a_diverged_phase_is_trained_again_from_the_newest_global_and_a_second_one_stops_the_worker():
    """A phase whose loss is NaN is not sent: the optimizer state is dropped, the model goes
    back to the newest global loaded, the phase is trained again; twice in a row is an error."""
    from fedjet.errors import TrainingError

    loops, _, _, trainer = _loops("fedavg", None, Link([]))
    losses = [float("nan"), 2.5]
    loaded = []
    trainer.optimizer = SimpleNamespace(state={"w": {"exp_avg": 1}})
    trainer.load = loaded.append
    trainer.train = lambda steps: StepsResult(losses.pop(0), steps, 10 * steps, 1.0, 1.0)
    loops.fallback = {"w": "the newest global"}
    phase = asyncio.run(loops._train(2))
    assert phase.result.mean_loss == 2.5 and trainer.optimizer.state == {} and loaded == [{"w": "the newest global"}]
    losses[:] = [float("nan"), float("nan")]
    with pytest.raises(TrainingError, match="diverged twice"):
        asyncio.run(loops._train(2))


def test_a_phase_stopped_before_its_first_step_is_not_sent_and_the_worker_ends_cleanly():
    """A SIGTERM that lands as a phase starts leaves it with no step and no loss (NaN): it is not
    an update (a header with a NaN loss is refused before sending) and not a divergence."""
    loops, versions, sent, trainer = _loops("fedavg", None, Link([]))

    def stopped(steps: int) -> StepsResult:
        loops.stopping.set()
        return StepsResult(mean_loss=float("nan"), sequences=0, tokens=0, compute_s=0.0, wall_s=0.0)

    trainer.train = stopped
    versions.release.set()
    asyncio.run(asyncio.wait_for(loops.run(), 10))
    assert sent.calls == []
