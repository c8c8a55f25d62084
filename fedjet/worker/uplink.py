"""Everything that leaves a worker as an update: the sequence number, the header, the three
kinds of send (compressed, masked for secure aggregation, the retirement notice) and the figures
they update. The loops in :mod:`fedjet.worker.loops` decide only *when* to send."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from fedjet.channel.globals import GlobalFollower
from fedjet.channel.updates import UpdateSender
from fedjet.codecs.messages import RETIRE, GlobalHead, UpdateHeader, frame_update
from fedjet.codecs.pipeline import Compressed
from fedjet.log import get_logger
from fedjet.metrics import WorkerMetrics
from fedjet.worker.job import LocalJob
from fedjet.worker.secure import SecureMember
from fedjet.worker.train import StepsResult

log = get_logger("fedjet.worker")


@dataclass
class WorkerStats:
    """One worker's figures for the report. ``compute_s`` is time inside the local training
    steps of phases whose update was sent (a phase trained and thrown away does not count);
    ``lifetime_s`` is the worker process's whole life up to the report, start-up and the wait
    for the final version included; idle is everything else: ``1 - compute_s / lifetime_s``.
    ``wait_s`` is the part of it spent waiting for a global version. ``bytes_up``/``bytes_down``
    are update and version payloads; ``socket_in``/``socket_out`` every byte the process's NATS
    connection read and wrote (protocol, headers, acknowledgements, stats included)."""

    cloud: str
    updates_sent: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    socket_in: int = 0
    socket_out: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    wall_s: float = 0.0
    lifetime_s: float = 0.0
    data_documents: int = 0
    data_tokens: int = 0
    heldout_loss: float | None = None
    initial_weights: str = ""  # "local" when version 0 came from this cloud's own copy
    retired: bool = False  # out of privacy budget
    dp_epsilon: float | None = None  # a DP job's ε spent so far
    peak_up_bytes_per_s: float = 0.0  # the most its socket wrote in any 1-second window
    island: bool = False  # its leaf keeps its updates and mirrors (island mode)
    island_steps: int = 0  # local steps trained while cut off from the hub
    island_updates: int = 0  # updates sent while cut off (they waited on the leaf)
    peak_rss_mb: float = 0.0  # the process's resident high-water mark (MiB)
    peak_device_mb: float | None = None  # the most device memory torch held at once (MiB; CUDA only)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        out["idle_frac"] = idle_fraction(self.compute_s, self.lifetime_s)
        return out


def idle_fraction(training_s: float, lifetime_s: float) -> float:
    """``1 - training_s / lifetime_s``: the one definition of idle for every schedule."""
    if not lifetime_s > 0:
        raise ValueError(f"a process lifetime must be positive, got {lifetime_s}")
    return max(0.0, 1.0 - training_s / lifetime_s)


@dataclass(frozen=True)
class Phase:
    """What one local phase produced: a mean gradient (gradient jobs) or None (the model moved),
    the steps' figures and the held-out loss (None under DP or without a held-out slice)."""

    gradient: dict[str, Any] | None
    result: StepsResult
    heldout: float | None


class Uplink:
    """One worker's update stream to the coordinator. Sequence numbers start at the wall clock in
    microseconds, so they increase across restarts: the coordinator's anti-replay counter."""

    def __init__(
        self,
        job: LocalJob,
        sender: UpdateSender,
        *,
        worker_id: str,
        follower: GlobalFollower,
        secure: SecureMember | None,
        stopping: asyncio.Event,
        stats: WorkerStats,
        metrics: WorkerMetrics,
        report: Callable[[], Awaitable[None]],
    ) -> None:
        self.job = job
        self.sender = sender
        self.worker_id = worker_id
        self.follower = follower
        self.secure = secure
        self.stopping = stopping
        self.stats = stats
        self.metrics = metrics
        self.report = report
        self.seq = time.time_ns() // 1000
        self.masked_base: tuple[GlobalHead, dict[str, Any]] | None = None  # what a masked update is measured from

    def rebase_masked(self, head: GlobalHead, tensors: dict[str, Any]) -> None:
        """A new version was loaded: masked updates are measured from it, dense."""
        if self.secure is not None:
            self.masked_base = (head, {n: t.detach().clone() for n, t in tensors.items()})

    def _next_seq(self) -> int:
        self.seq = max(self.seq + 1, time.time_ns() // 1000)
        return self.seq

    def header(self, base_version: int, result: StepsResult, heldout: float | None) -> UpdateHeader:
        job, spec = self.job, self.job.spec
        return UpdateHeader(
            job=spec.job,
            cloud=self.stats.cloud,
            worker=self.worker_id,
            seq=self._next_seq(),
            base_version=base_version,
            samples=job.data.samples(spec.config.train.seq_len),
            loss=result.mean_loss,
            kind=spec.update_kind,
            codec="secure-agg" if self.secure is not None else job.codec.text,
            tokens=result.tokens_per_replica,  # pacing turns it into steps; every rank takes the same steps
            compute_s=result.compute_s,
            wall_s=result.wall_s,
            sent_unix=time.time(),
            data_tokens=job.data.tokens,
            heldout_loss=heldout,
            dp=None if job.private is None else job.private.claim(),
        )

    async def send_phase(self, base_version: int, steps: int, phase: Phase) -> None:
        """The update of a phase just trained on ``base_version``: masked in a secure job,
        else compressed from the gradient or from the model's move since the base."""
        header = self.header(base_version, phase.result, phase.heldout)
        if self.secure is not None:
            sent = await self._send_masked(header, phase.gradient)
        else:
            tracker, trainer = self.job.tracker, self.job.trainer
            if phase.gradient is not None:
                compressed = await asyncio.to_thread(tracker.compress_gradient, phase.gradient)
            else:
                compressed = await asyncio.to_thread(tracker.compress_delta, trainer.weights())
            sent = await self._publish(header, compressed)
        await self._sent(header, steps, phase.result, sent)

    async def send_compressed(
        self, header: UpdateHeader, compressed: Compressed, steps: int, result: StepsResult
    ) -> None:
        """An update compressed (and given its header) before this call: the overlapped schedule's."""
        with structlog.contextvars.bound_contextvars(version=header.base_version):
            await self._sent(header, steps, result, await self._publish(header, compressed))

    async def retire(self, base_version: int) -> None:
        """Out of privacy budget: tell the coordinator this cloud sends no more updates."""
        private = self.job.private
        assert private is not None
        seq = self._next_seq()
        header = UpdateHeader(
            job=self.job.spec.job, cloud=self.stats.cloud, worker=self.worker_id, seq=seq,
            base_version=base_version, samples=0, loss=0.0, kind=RETIRE, dp=private.claim(),
        )  # fmt: skip
        await self.sender.send(frame_update(header, []), seq)
        self.stats.retired = True
        log.warning("privacy_budget_spent", epsilon=round(private.ledger.epsilon_spent(), 4))

    async def _publish(self, header: UpdateHeader, compressed: Compressed) -> int:
        published = await self.sender.send(frame_update(header, compressed.entries), header.seq)
        return published.wire_bytes

    async def _send_masked(self, header: UpdateHeader, gradient: dict[str, Any] | None) -> int | None:
        """Secure aggregation: the update leaves only masked; None when its round was missed.

        Synchronous rules measure it from the base and take only a round on that base; FedBuff
        measures it from the last send (or the last version loaded) and joins a later round
        while its staleness is within ``--max-staleness``."""
        assert self.secure is not None and self.masked_base is not None
        spec = self.job.spec
        head, reference = self.masked_base
        current = self.job.trainer.weights()
        if gradient is None:
            gradient = {n: current[n].detach().float() - reference[n].float() for n in reference}
        buffered = not spec.synchronous
        slack = spec.strategy.max_staleness if buffered else 0
        link, before = self.secure.link, self.secure.link.bytes_sent

        def too_late() -> bool:
            follower = self.follower
            if self.stopping.is_set() or follower.final is not None:
                return True  # stopping, or the job is over: no round will open again
            return follower.latest is not None and follower.latest.version - head.version > slack

        if not await self.secure.contribute(gradient, header, head.hash, too_late, later_rounds=buffered):
            log.warning("secagg_round_missed", base=head.version)
            return None
        if buffered:  # the next delta starts where this one ended
            self.masked_base = (head, {n: t.detach().clone() for n, t in current.items()})
        return link.bytes_sent - before

    async def _sent(self, header: UpdateHeader, steps: int, result: StepsResult, sent: int | None) -> None:
        """Count an update that left (``sent`` wire bytes; None: its secure round was missed)."""
        if sent is None:
            return
        self.stats.updates_sent += 1
        self.stats.bytes_up += sent
        self.metrics.sent(sent)
        if self.job.private is not None:
            self.stats.dp_epsilon = self.job.private.ledger.epsilon_spent()
            self.metrics.dp_epsilon(self.stats.dp_epsilon)
        self.stats.tokens += result.tokens
        self.stats.compute_s += result.compute_s
        log.info(
            "update_sent",
            worker=header.worker,
            seq=header.seq,
            base=header.base_version,
            steps=steps,
            loss=round(result.mean_loss, 4),
            heldout_loss=None if header.heldout_loss is None else round(header.heldout_loss, 4),
            bytes=sent,
        )
        await self.report()
