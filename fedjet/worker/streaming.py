"""``--fragments F``: Streaming DiLoCo's schedule in synchronous rounds, overlapped with compute.

The model is split into F fragments (the plan in the job spec). Round v synchronises fragment
k = v mod F only: each cloud trains ``local_steps / F`` steps, sends fragment k's change since k
was last synchronised (error feedback per fragment), and **goes on training** while the update
uploads, the round closes and version v+1 downloads. So each fragment is synchronised every
``local_steps`` steps, the fragments one after another (fragment k at offset k·H/F), and what
crosses the link at a time is one fragment, not the model. The job's last F rounds drain
(:meth:`FragmentPlan.phase_steps`): one long phase, then every fragment synchronised a step apart.

The returning fragment is merged between two steps, keeping what the cloud learnt since it
sent: with S_k the fragment as sent and G_k as it came back, ``θ_k ← θ_k + (1 − α)·(G_k − S_k)``
(α = ``--fragment-alpha``; Streaming DiLoCo's mixing, applied to the fragment as sent; with α = 0,
the default, the fragment becomes the global plus the steps taken since). The next change of fragment k is
measured from G_k. The worker waits only when a phase ends before the version it needs for its
next update has arrived, or before the previous upload is done.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from fedjet.codecs.fragments import FragmentPlan
from fedjet.codecs.messages import GlobalHead
from fedjet.worker.delta import DeltaTracker

if TYPE_CHECKING:
    from fedjet.worker.loops import TrainingLoops

Arrival = tuple[GlobalHead, dict[str, Any] | None]  # the next version, its tensors (None: the job is over)


class UploadCadence:
    """When the drain's short phases may start their uploads: no sooner after the last upload
    than the run's ordinary phases sent them, so the drain does not put two fragments on the
    link in the time of one (the peak upload rate stays that of one fragment per phase). The
    wait is the worker's idle time, counted as such."""

    def __init__(self, ordinary_steps: int) -> None:
        self.ordinary_steps = ordinary_steps
        self.last_start: float | None = None
        self.last_steps = 0
        self.interval_s = 0.0  # between the starts of two ordinary uploads, the latest seen

    def hold_s(self, phase_steps: int, now: float | None = None) -> float:
        """Seconds to hold the upload of a phase of ``phase_steps`` about to start (0 but in
        the drain's short phases)."""
        now = time.perf_counter() if now is None else now
        hold = 0.0
        if self.last_start is not None:
            if phase_steps < self.ordinary_steps:
                hold = max(0.0, self.last_start + self.interval_s - now)
            elif phase_steps == self.ordinary_steps == self.last_steps:
                self.interval_s = now - self.last_start
        self.last_start, self.last_steps = now + hold, phase_steps
        return hold


class StreamingSchedule:
    def __init__(self, loops: TrainingLoops, plan: FragmentPlan) -> None:
        self.loops = loops
        self.plan = plan
        self.alpha = loops.job.spec.config.train.fragment_alpha

    async def run(self) -> None:
        loops, plan, job = self.loops, self.plan, self.loops.job
        first = await loops._first_version()
        if first is None:
            return
        head, version, steps = first
        rounds = job.spec.config.stop.rounds
        trackers = [DeltaTracker(job.codec, reference="base") for _ in range(plan.count)]
        for k, tracker in enumerate(trackers):
            tracker.rebase({n: version.tensors[n] for n in plan.names(k)}, 0)
        arrival: asyncio.Task[Arrival] | None = None
        upload: asyncio.Task[None] | None = None
        cadence = UploadCadence(plan.phase_steps(0, steps, None))
        try:
            while not loops.stopping.is_set():
                claims = head.version + (0 if arrival is None else 1)  # the round this phase's update joins
                phase_steps = plan.phase_steps(claims, steps, rounds)
                phase = await loops._train(phase_steps)
                wait_from = time.perf_counter()
                if upload is not None:
                    await upload  # one upload at a time: sequence numbers stay in order
                if arrival is not None:  # the version the last fragment went into
                    following, tensors = await arrival
                    if tensors is None:
                        break
                    job.trainer.apply_corrections()  # a merge that came after the last step
                    sent = plan.of_version(head.version)
                    trackers[sent].rebase({n: tensors[n] for n in plan.names(sent)}, following.version)
                    loops.metrics.version(following.version)
                    head = following
                loops._count_idle(wait_from)
                k = plan.of_version(head.version)
                with structlog.contextvars.bound_contextvars(version=head.version, fragment=k):
                    current = job.trainer.weights()
                    fragment = {n: current[n].detach().clone() for n in plan.names(k)}  # S_k, as sent
                    compressed = await asyncio.to_thread(trackers[k].compress_delta, fragment)
                    header = loops.uplink.header(head.version, phase.result, phase.heldout)
                    hold_s = cadence.hold_s(phase_steps)
                    send = functools.partial(
                        loops.uplink.send_compressed, header, compressed, phase_steps, phase.result
                    )
                    upload = asyncio.create_task(self._send_after(hold_s, send))
                arrival = asyncio.create_task(self._arrive(head.version, fragment))
            if upload is not None and not upload.done():
                await upload
        finally:
            for task in (upload, arrival):
                if task is not None and not task.done():
                    task.cancel()

    @staticmethod
    async def _send_after(hold_s: float, send: Callable[[], Awaitable[None]]) -> None:
        """``send()`` after ``hold_s`` seconds (nothing is made of it when cancelled before)."""
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        await send()

    async def _arrive(self, after: int, sent: dict[str, Any]) -> Arrival:
        """The version after ``after``, downloaded while the worker trains on; its fragment is
        merged into the model at the next step (see the module doc). A final marker ends the
        phase instead: nothing will take another update."""
        loops = self.loops
        following = await loops.follower.newer_than(after)
        if loops.follower.final is not None or following.final:
            loops.job.trainer.stopping.set()
            return following, None
        fetched = await loops.follower.fetch(following)
        tensors = fetched.tensors
        loops.job.trainer.correct({n: (1.0 - self.alpha) * (tensors[n] - s) for n, s in sent.items()})
        return following, tensors
