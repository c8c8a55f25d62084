"""``fedjet bench chaos``, the scenario: coordinator kills, nats-server restarts and worker kills,
each kind spread over the job's versions in a task of its own, then the job's clean end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fedjet.bench.chaos_cluster import Cluster, HeadWatcher
from fedjet.bench.chaos_config import EARLY_KILLS, ChaosConfig, ChaosFailed


@dataclass
class ChaosRun:
    config: ChaosConfig
    cluster: Cluster
    watcher: HeadWatcher
    deadline: float
    counts: Counter[str] = field(default_factory=Counter)

    async def until(self, done: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        """Poll the head and the children until ``done()``; crashes are restarted meanwhile."""
        deadline = self.deadline if timeout_s is None else min(self.deadline, time.monotonic() + timeout_s)
        while True:
            await self.watcher.poll()
            self.cluster.check()
            if done():
                return
            if time.monotonic() > deadline:
                raise ChaosFailed(f"chaos: timed out waiting for {what} (at version {self.watcher.version})")
            await asyncio.sleep(0.2)

    async def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        await self.until(lambda: time.monotonic() >= end or self.watcher.final, "a pause")


async def _kill_coordinator(run: ChaosRun, rng: random.Random) -> None:
    cluster = run.cluster
    assert cluster.coordinator is not None
    cluster.kill(cluster.coordinator)
    cluster.spawn_coordinator()  # the same command, at once: a supervisor would do this


async def _restart_nats(run: ChaosRun, rng: random.Random) -> None:
    run.cluster.stop_nats()  # SIGTERM: a clean shutdown, as an operator's restart
    await asyncio.sleep(rng.uniform(0.2, max(0.2, run.config.max_down_s)))
    run.cluster.start_nats()


async def _kill_worker(run: ChaosRun, rng: random.Random) -> None:
    cloud = rng.choice(run.config.clouds)
    run.cluster.absent.add(cloud)
    run.cluster.kill(run.cluster.workers[cloud])
    await asyncio.sleep(rng.uniform(0.0, run.config.max_down_s))
    run.cluster.spawn_worker(cloud)
    run.cluster.absent.discard(cloud)


async def _kill_rank(run: ChaosRun, rng: random.Random) -> None:
    """SIGKILL one extra rank of a cloud's worker: the worker must stop on its own, naming the
    lost rank (a hang or a traceback fails the run); then it is restarted and must resume."""
    cloud = rng.choice(run.config.clouds)
    cluster, worker = run.cluster, run.cluster.workers[cloud]
    ranks = cluster.ranks_of(worker)
    if not ranks:
        raise ChaosFailed(f"chaos: {cloud}'s worker has no extra rank to kill (is it started with --nproc-per-node?)")
    cluster.absent.add(cloud)
    with contextlib.suppress(ProcessLookupError):
        os.kill(rng.choice(ranks), signal.SIGKILL)
    await run.until(lambda: worker.returncode is not None, f"{cloud}'s worker to stop after a rank died", 120.0)
    tail = worker.log_tail(40)
    if worker.returncode == 0 or '"rank_lost"' not in tail or "Traceback" in tail:
        raise ChaosFailed(f"chaos: {cloud}'s worker did not stop cleanly on a lost rank:\n{tail}")
    run.counts["rank_lost_exits"] += 1
    cluster.spawn_worker(cloud)
    cluster.absent.discard(cloud)


EVENTS = {"coordinator": _kill_coordinator, "nats": _restart_nats, "worker": _kill_worker, "rank": _kill_rank}


async def drive(run: ChaosRun) -> None:
    """Each kind of event in its own task, so kinds overlap (a worker may die while the
    coordinator resumes, the server may go away while a worker starts); then the end."""
    horizon = run.config.horizon
    tasks = [asyncio.ensure_future(_events(run, kind, n, horizon)) for kind, n in run.config.counts.items() if n > 0]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await _finish(run)


async def _finish(run: ChaosRun) -> None:
    """The final version, then every process's clean exit. A coordinator that exits without
    a final version (its idle timeout: something stalled) ends the run at once."""
    cluster, watcher = run.cluster, run.watcher
    await run.until(lambda: watcher.final or cluster.finished, "the final version")
    try:
        await run.until(lambda: watcher.final, "the final version after the coordinator exited", timeout_s=15.0)
    except ChaosFailed as e:
        tail = cluster.coordinator.log_tail(10) if cluster.coordinator is not None else ""
        raise ChaosFailed(f"{e}; the coordinator's last lines:\n{tail}") from e
    await run.until(cluster.settled, "the coordinator and workers to exit", timeout_s=180.0)


async def _events(run: ChaosRun, kind: str, n: int, horizon: int) -> None:
    """``n`` events of one kind spread over the first ``horizon`` versions: the i-th waits for
    version ``(i + 1) * horizon / (n + 1)`` and for one newer than the kind's last event, then a
    random part of a round. A quarter of the coordinator kills after the first skip the wait
    and land while the restarted coordinator is still starting or resuming."""
    rng = random.Random(f"{run.config.seed}:{kind}")  # per kind: the same draws whatever the timing
    last = 0
    for i in range(n):
        if kind == "coordinator" and i > 0 and rng.random() < EARLY_KILLS:
            at = run.cluster.coordinator_spawned + rng.uniform(0.5, 4.0)
            await run.pause(max(0.0, at - time.monotonic()))
        else:
            target = max(last + 1, (i + 1) * horizon // (n + 1))
            await run.until(lambda t=target: run.watcher.version >= t or run.watcher.final, f"version {target}")
            await run.pause(rng.uniform(0.0, 1.2 * run.watcher.round_s()))
        if run.watcher.final or run.cluster.finished:
            return
        await EVENTS[kind](run, rng)
        run.counts[kind] += 1
        last = run.watcher.version
