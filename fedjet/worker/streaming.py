"""``--fragments F``: Streaming DiLoCo's schedule in synchronous rounds.

The model is split into F fragments (the plan in the job spec). Round v synchronises fragment
k = v mod F only: each cloud trains ``local_steps / F`` steps, sends fragment k's change since k
was last synchronised (its own error feedback per fragment), and waits for version v+1, in which
only fragment k moved. So each fragment is synchronised every ``local_steps`` steps, the
fragments one after another (fragment k at offset k·H/F), and what crosses the link in a round
is one fragment, not the model.

The returning fragment is **merged**, not loaded: ``θ_k ← α·θ_k + (1 − α)·G_k`` (α =
``--fragment-alpha``, Streaming DiLoCo's mixing; 0 takes the global as it is), and the other
fragments keep the cloud's own progress. The next change of fragment k is measured from G_k.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from fedjet.codecs.fragments import FragmentPlan
from fedjet.worker.delta import DeltaTracker

if TYPE_CHECKING:
    from fedjet.worker.loops import TrainingLoops


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
        phase_steps = max(1, steps // plan.count)
        trackers = [DeltaTracker(job.codec, reference="base") for _ in range(plan.count)]
        for k, tracker in enumerate(trackers):
            tracker.rebase({n: version.tensors[n] for n in plan.names(k)}, 0)
        while not loops.stopping.is_set():
            k = plan.of_version(head.version)
            with structlog.contextvars.bound_contextvars(version=head.version, fragment=k):
                phase = await loops._train(phase_steps)
                current = job.trainer.weights()
                fragment = {n: current[n] for n in plan.names(k)}
                compressed = await asyncio.to_thread(trackers[k].compress_delta, fragment)
                header = loops.uplink.header(head.version, phase.result, phase.heldout)
                await loops.uplink.send_compressed(header, compressed, phase_steps, phase.result)
            wait_from = time.perf_counter()
            following = await loops.follower.newer_than(head.version)
            if loops.follower.final is not None or following.final:
                break
            fetched = await loops.follower.fetch(following)
            loops._count_idle(wait_from)
            self._merge(k, fetched.tensors)
            trackers[k].rebase({n: fetched.tensors[n] for n in plan.names(k)}, following.version)
            loops.metrics.version(following.version)
            head = following

    def _merge(self, k: int, global_: dict[str, object]) -> None:
        """Fragment k becomes α·local + (1 − α)·global; the other fragments stay as trained."""
        trainer = self.loops.job.trainer
        current = trainer.weights()
        change = {n: (1.0 - self.alpha) * (global_[n] - current[n]) for n in self.plan.names(k)}  # type: ignore[operator]
        trainer.correct(change)
        trainer.apply_corrections()
