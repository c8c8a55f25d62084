"""When a worker trains and when it sends: the ``wait`` schedule (each phase from the newest
global) and the ``overlap`` schedule (the next phase trains while the last update uploads).
What is sent, and how, is the :class:`~fedjet.worker.uplink.Uplink`'s.

Island mode (``wait`` schedule, a worker on an island-capable leaf): where the worker would wait
for a version and its leaf has lost the hub, it trains on from where it is instead, up to
``--island-max-steps`` local steps past its newest version. ``--island queue`` sends each phase's
update as usual (it waits durably in the leaf's stream); ``accumulate`` folds the phases into one
update, sent as soon as the link answers again. Either way the update claims the newest version
the worker had, so the coordinator's staleness rules weigh it."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import structlog

from fedjet.channel.globals import GlobalFollower
from fedjet.channel.island import IslandLink
from fedjet.codecs.messages import GlobalHead, GlobalVersion
from fedjet.errors import TrainingError
from fedjet.malloc import return_freed_heap
from fedjet.metrics import WorkerMetrics
from fedjet.worker.job import LocalJob
from fedjet.worker.streaming import StreamingSchedule
from fedjet.worker.train import StepsResult
from fedjet.worker.uplink import Phase, Uplink, WorkerStats

# Phases that would start before this version wait for it: the first updates are the largest
# and most diverse, and a phase trained from a cloud's own estimate of the global costs most there.
OVERLAP_FROM_VERSION = 1
ISLAND_CHECK_S = 2.0  # while waiting for a version, how often the link to the hub is asked


class TrainingLoops:
    """One worker's rounds, from the first version to the final marker, a stop or a spent budget."""

    def __init__(
        self,
        job: LocalJob,
        follower: GlobalFollower,
        uplink: Uplink,
        *,
        stats: WorkerStats,
        metrics: WorkerMetrics,
        stopping: asyncio.Event,
        island: IslandLink | None = None,
    ) -> None:
        self.job = job
        self.follower = follower
        self.uplink = uplink
        self.stats = stats
        self.metrics = metrics
        self.stopping = stopping
        self.island = island
        self.island_steps = 0  # local steps trained past the newest version while cut off
        self.held: tuple[Phase, int] | None = None  # accumulate: the folded phases and their steps
        self.waiting = 0  # updates sent while this island has been cut off
        self.fallback: dict[str, Any] | None = None  # the newest global loaded: where a diverged phase restarts

    async def run(self) -> None:
        plan = self.job.spec.fragment_plan
        if plan is not None:  # --fragments: one fragment a round (fedjet.worker.streaming)
            await StreamingSchedule(self, plan).run()
        elif self.job.spec.config.train.schedule == "overlap":
            await self._overlap_schedule()
        else:
            await self._wait_schedule()

    def _count_idle(self, since: float) -> None:
        """Time since ``since`` (a ``perf_counter`` reading) was spent waiting for a version."""
        self.stats.wait_s += time.perf_counter() - since

    async def _wait_schedule(self) -> None:
        """Sync: wait for each new global. Async: take the newest between local rounds, if any."""
        spec, follower, private = self.job.spec, self.follower, self.job.private
        base: GlobalHead | None = None
        steps = spec.config.train.local_steps
        local_v0 = self._hold_version_zero()
        sends_on_base = 0
        while not self.stopping.is_set():
            wait_from = time.perf_counter()
            if base is not None and await self._cut_off_with_steps_left(base):
                self._count_idle(wait_from)
                await self._island_phase(base, steps)  # an island trains on from where it is
                continue
            if base is None or spec.synchronous or sends_on_base >= spec.strategy.max_staleness:
                # sync rounds wait for each version; an async worker that sent max_staleness
                # updates on one base pauses, since more would arrive too stale to be applied
                head: GlobalHead | None = await self._await_version(base)
                if head is None:  # the link dropped while waiting
                    continue
            else:
                latest = follower.latest
                head = latest if latest is not None and latest.version > base.version else None
            if follower.final is not None:
                break
            if head is not None:
                if self.held is not None and base is not None:  # an island's work, before it is overwritten
                    await self._send_held(base)
                self.island_steps = 0
                await self._load(head, local_v0)
                base, sends_on_base = head, 0
                steps = self._assigned_steps(head, steps)
            self._count_idle(wait_from)
            assert base is not None
            if private is not None and not private.affordable(steps):
                await self.uplink.retire(base.version)
                break
            with structlog.contextvars.bound_contextvars(version=base.version):
                phase = await self._train(steps)
                if phase.result.sequences == 0:  # stopped before its first step: nothing to send
                    break
                await self.uplink.send_phase(base.version, steps, phase)
            sends_on_base += 1

    async def _cut_off_with_steps_left(self, base: GlobalHead) -> bool:
        """Island mode: is the hub out of reach while this worker may still train past ``base``?
        Held work goes out as soon as the link answers again."""
        if self.island is None:
            return False
        up = await self.island.link_up()
        self.waiting = 0 if up else self.waiting
        self.metrics.island(up=up, waiting=self.waiting)
        if up:
            if self.held is not None:
                await self._send_held(base)
            return False
        return self.island_steps < self.job.spec.island_max_steps and not self.stopping.is_set()

    async def _await_version(self, base: GlobalHead | None) -> GlobalHead | None:
        """The next version after ``base``; None when this worker is an island with steps left
        to train (its leaf has lost the hub). Work held by ``--island accumulate`` is sent as
        soon as the link answers again, before waiting on."""
        after = -1 if base is None else base.version
        if self.island is None or base is None:
            return await self.follower.newer_than(after)
        waiting = asyncio.ensure_future(self.follower.newer_than(after))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=ISLAND_CHECK_S)
                if done:
                    return waiting.result()
                if await self._cut_off_with_steps_left(base):
                    return None
        finally:
            if not waiting.done():
                waiting.cancel()

    async def _island_phase(self, base: GlobalHead, steps: int) -> None:
        """One local phase trained while cut off, from where the model is (the newest version
        plus this cloud's progress since): sent (queue) or folded into the held update."""
        steps = min(steps, self.job.spec.island_max_steps - self.island_steps)
        private = self.job.private
        if private is not None and not private.affordable(steps):
            self.island_steps = self.job.spec.island_max_steps  # wait for the link, train no more
            return
        with structlog.contextvars.bound_contextvars(version=base.version, island=True):
            phase = await self._train(steps)
            if phase.result.sequences == 0:  # stopped before its first step
                return
            self.island_steps += steps
            self.stats.island_steps += steps
            if self.job.spec.island_policy == "queue":
                await self.uplink.send_phase(base.version, steps, phase)
                self.stats.island_updates += 1
                self.waiting += 1
            else:
                held_phase, held_steps = self.held if self.held is not None else (None, 0)
                self.held = (phase if held_phase is None else _folded(held_phase, phase), held_steps + steps)
            structlog.get_logger("fedjet.worker").info(
                "island_phase", steps=steps, island_steps=self.island_steps, policy=self.job.spec.island_policy
            )

    async def _send_held(self, base: GlobalHead) -> None:
        """``--island accumulate``: the phases trained while cut off, as one update on ``base``."""
        assert self.held is not None
        (phase, steps), self.held = self.held, None
        with structlog.contextvars.bound_contextvars(version=base.version, island=True):
            await self.uplink.send_phase(base.version, steps, phase)
        self.stats.island_updates += 1

    async def _load(self, head: GlobalHead, local_v0: dict[str, Any]) -> None:
        """Train from version ``head`` from now on, and measure updates from it."""
        version = await self.follower.fetch(head)
        if head.version == 0:
            self._note_initial_weights(version, local_v0)
        self.job.trainer.load(version.tensors)
        self.fallback = version.tensors
        self.uplink.rebase_masked(head, version.tensors)
        self.metrics.version(head.version)
        self.job.tracker.rebase(version.tensors, head.version)

    async def _overlap_schedule(self) -> None:
        """``--schedule overlap`` (synchronous delta rules): the next local phase trains while the
        last update uploads and the version it goes into is made and downloaded, as
        one-step-delayed and streaming DiLoCo do.

        A phase starts where the last one ended, W_k = G_k-1 + (this cloud's own progress). When
        G_k (the version its last update went into) arrives mid-phase, the difference G_k - W_k
        is added to the model between two steps, so the rest of the phase trains on the global;
        the update is measured from G_k and claims it as its base. Only the steps before that
        version arrived were taken from the cloud's own estimate of it. The worker waits only
        when that version has not arrived by the end of a phase, or when the previous upload
        is still going.
        """
        first = await self._first_version()
        if first is None:
            return
        head, version, steps = first
        claim: tuple[GlobalHead, GlobalVersion] | None = (head, version)  # phase 1 claims version 0
        upload: asyncio.Task[None] | None = None
        upcoming: asyncio.Task[tuple[GlobalHead, GlobalVersion]] | None = None
        private = self.job.private
        try:
            while not self.stopping.is_set():
                if private is not None and not private.affordable(steps):
                    await self.uplink.retire(head.version)
                    break
                if claim is None:  # fetch the next version while training; correct towards it on arrival
                    upcoming = self._download_after(head.version)
                    if head.version < OVERLAP_FROM_VERSION:  # early phases wait for their version
                        await self._idle_until(upcoming)
                phase = await self._train(steps)
                if phase.result.sequences == 0:  # stopped before its first step: nothing to send
                    break
                wait_from = time.perf_counter()
                if claim is None:
                    assert upcoming is not None
                    claim, upcoming = await upcoming, None
                if upload is not None:
                    await upload  # one upload at a time: sequence numbers stay in order
                self._count_idle(wait_from)
                head, version = claim
                if self.follower.final is not None or head.final:
                    break
                upload = await self._start_upload(head, version, steps, phase)
                steps = self._assigned_steps(head, steps)
                claim = None
            if upload is not None and not upload.done():
                await upload
        finally:
            for task in (upload, upcoming):
                if task is not None and not task.done():
                    task.cancel()

    async def _first_version(self) -> tuple[GlobalHead, GlobalVersion, int] | None:
        """Version 0 loaded, with the steps its record assigns; None when the job is already over."""
        local_v0 = self._hold_version_zero()
        wait_from = time.perf_counter()
        head = await self.follower.newer_than(-1)
        if self.follower.final is not None:
            return None
        version = await self.follower.fetch(head)
        self._note_initial_weights(version, local_v0)
        self.job.trainer.load(version.tensors)
        self.fallback = version.tensors
        steps = self._assigned_steps(head, self.job.spec.config.train.local_steps)
        self._count_idle(wait_from)
        return head, version, steps

    def _download_after(self, version: int) -> asyncio.Task[tuple[GlobalHead, GlobalVersion]]:
        start = {n: t.detach().clone() for n, t in self.job.trainer.weights().items()}
        return asyncio.create_task(self._version_after(version, start))

    async def _idle_until(self, task: asyncio.Task[Any]) -> None:
        wait_from = time.perf_counter()
        await asyncio.wait([task])
        self._count_idle(wait_from)

    async def _start_upload(
        self, head: GlobalHead, version: GlobalVersion, steps: int, phase: Phase
    ) -> asyncio.Task[None]:
        """Measure the phase's update from ``head`` (the version it goes into) and send it while
        the next phase trains."""
        trainer, tracker = self.job.trainer, self.job.tracker
        trainer.apply_corrections()  # a version that came after the last step
        self.metrics.version(head.version)
        tracker.rebase(version.tensors, head.version)  # the update is measured from it
        compressed = await asyncio.to_thread(tracker.compress_delta, trainer.weights())
        header = self.uplink.header(head.version, phase.result, phase.heldout)
        return asyncio.create_task(self.uplink.send_compressed(header, compressed, steps, phase.result))

    def _hold_version_zero(self) -> dict[str, Any]:
        """Version 0 as this cloud built it (a copy: training changes the model in place): not
        downloaded when its hash is the signed one."""
        local_v0 = {n: t.clone() for n, t in self.job.trainer.weights().items()}
        self.follower.hold_local(0, local_v0)
        return local_v0

    def _note_initial_weights(self, version: GlobalVersion, local_v0: dict[str, Any]) -> None:
        self.stats.initial_weights = "local" if version.tensors is local_v0 else "downloaded"

    def _assigned_steps(self, head: GlobalHead, default: int) -> int:
        """This cloud's local steps as the version's record assigns them (dynamic partition).
        Under DP the record also says how many steps this cloud has spent in all, and the
        ledger starts there (a restarted worker does not get its budget back)."""
        record = self.follower.record(head)
        if self.job.private is not None:
            self.job.private.catch_up(record.progress.dp_steps.get(self.stats.cloud, 0))
        return record.assignment.get(self.stats.cloud, default)

    async def _version_after(self, version: int, start: dict[str, Any]) -> tuple[GlobalHead, GlobalVersion]:
        """The next global after ``version``, downloaded while the worker trains on from
        ``start``; the model is moved onto it by ``global - start`` at the next step. A final
        marker cuts the phase short instead: nothing will take its update."""
        head = await self.follower.newer_than(version)
        if self.follower.final is not None or head.final:
            self.job.trainer.stopping.set()
            return head, GlobalVersion(head.header, {})
        fetched = await self.follower.fetch(head)
        self.job.trainer.correct({n: t - start[n] for n, t in fetched.tensors.items()})
        return head, fetched

    async def _train(self, steps: int) -> Phase:
        """One local phase (see :meth:`_phase`). A phase whose loss is not finite diverged: the
        optimizer state is dropped, the model goes back to the newest global it loaded, and the
        phase is trained again; a second divergence stops the worker with a named error."""
        phase = await self._phase(steps)
        if math.isfinite(phase.result.mean_loss) or phase.result.sequences == 0:
            return phase
        structlog.get_logger("fedjet.worker").warning("phase_diverged", steps=steps, action="reset, train again")
        trainer = self.job.trainer
        trainer.optimizer.state.clear()
        if self.fallback is not None:
            trainer.load(self.fallback)
        phase = await self._phase(steps)
        if not math.isfinite(phase.result.mean_loss):
            raise TrainingError(f"local training diverged twice in a row (loss {phase.result.mean_loss})")
        return phase

    async def _phase(self, steps: int) -> Phase:
        """``steps`` optimizer steps (or one mean gradient), then held-out loss."""
        spec, trainer, private = self.job.spec, self.job.trainer, self.job.private
        gradient: dict[str, Any] | None = None
        await asyncio.to_thread(return_freed_heap)  # the last version's and update's buffers
        if spec.update_kind == "gradient":
            gradient, result = await asyncio.to_thread(trainer.gradient, steps)
        else:
            train = trainer.train if private is None else private.train
            result = await asyncio.to_thread(train, steps)
        # Under DP no loss leaves the worker: both are functions of the private records.
        heldout = await asyncio.to_thread(self._heldout_loss) if private is None else None
        return Phase(gradient, result, heldout)

    def _heldout_loss(self) -> float | None:
        """Loss of the freshly trained local model on this cloud's held-out slice."""
        data, trainer = self.job.data, self.job.trainer
        if data.heldout is None:
            return None
        loss = trainer.evaluate(data.heldout).loss
        self.stats.heldout_loss = loss
        return loss


def _folded(first: Phase, then: Phase) -> Phase:
    """Two phases as one: the model moved through both (no gradient is kept: accumulate is for
    the delta rules), their figures summed, the later held-out loss."""
    a, b = first.result, then.result
    tokens = a.tokens + b.tokens
    loss = (a.mean_loss * a.tokens + b.mean_loss * b.tokens) / tokens if tokens else b.mean_loss
    result = StepsResult(
        mean_loss=loss,
        sequences=a.sequences + b.sequences,
        tokens=tokens,
        compute_s=a.compute_s + b.compute_s,
        wall_s=a.wall_s + b.wall_s,
        replicas=b.replicas,
    )
    return Phase(None, result, then.heldout)
