"""The coordinator service: consume -> admit -> batch -> aggregate -> publish -> ack.

Updates come from the :class:`UpdateInbox` strictly in JetStream sequence order (a chunked
update takes the place of its last chunk). Each message is acked only once the global version
that includes it has been published (stored by JetStream), so a crash never loses an update.
Anything malformed, forged, stale or oversized is rejected, counted and logged; it never stops
the service. Admission, batching, aggregation and the record are pure pieces shared with replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import structlog

from fedjet.broker.connect import default_replicas, open_target
from fedjet.broker.jetstream import close_quietly, ensure_job_streams
from fedjet.broker.socket_bytes import socket_bytes_of
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower, GlobalPublisher
from fedjet.channel.island import IslandSourcer
from fedjet.channel.kv import publish_spec, put_coordinator_stats, read_spec
from fedjet.channel.updates import Arrival, UpdateInbox, stream_seqs
from fedjet.codecs.crypto import COORDINATOR, ReplayGuard, envelope_limit
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import RETIRE, GlobalHead
from fedjet.codecs.record import Progress, SecureRecord
from fedjet.codecs.withheld import withhold
from fedjet.config.codec import CodecSpec
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.aggregate import Weights
from fedjet.coordinator.checkpoint import Checkpoint, last_checkpoint
from fedjet.coordinator.config import CoordinatorConfig
from fedjet.coordinator.local_state import LocalState, Published, check_not_behind
from fedjet.coordinator.pacing import Pacer
from fedjet.coordinator.privacy_check import PrivacyBudget
from fedjet.coordinator.record import Committed, Ledger
from fedjet.coordinator.rounds import Batcher
from fedjet.coordinator.secure_service import SecureRounds
from fedjet.coordinator.strategies import Aggregator, Applied, strategy_for
from fedjet.errors import ConfigError, FedjetError, NonFiniteError, StaleUpdateError
from fedjet.lifetime import peak_rss_mb, process_lifetime_s
from fedjet.log import get_logger
from fedjet.metrics import CoordinatorMetrics
from fedjet.spec import JobSpec

log = get_logger("fedjet.coordinator")
__all__ = ["Coordinator", "CoordinatorConfig"]
Batched = tuple[Applied, Committed]  # an admitted update waiting in a batch: what to fold, what to commit


class Coordinator:
    """``await Coordinator(cfg).run(initial_weights)``; ``stop()`` stops taking work (the job
    resumes with the same command), ``finish()`` ends the job with a final version.

    Plain, asynchronous and FedBuff batches (:meth:`_fold`) and secure rounds
    (:class:`SecureRounds`, which sees this class as a :class:`~fedjet.coordinator.committer.Committer`)
    all end in the one :meth:`commit`."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        spec = config.spec
        self.subjects = JobSubjects(spec.job)
        self.ledger = Ledger()
        self.aggregator: Aggregator | None = None
        self._stop = asyncio.Event()
        self._finish = False
        strategy = strategy_for(spec.strategy)
        self._batcher: Batcher[Batched] = Batcher(
            synchronous=strategy.synchronous,
            clouds=spec.clouds,
            policy=spec.config.round,
            size=strategy.batch_size(len(spec.clouds)),
        )
        self._guard = ReplayGuard()
        self.budget = PrivacyBudget()  # DP steps each cloud claimed: admission checks and charges it
        self.pacer = Pacer(spec)  # dynamic partitioning: speeds and step assignments
        self.metrics = config.metrics or CoordinatorMetrics()  # a private registry unless served
        self.limits = config.limits or Limits()
        self._admission = Admission(spec, config.boxes, self.limits)
        self._state = LocalState(config.state_dir, spec.job) if config.state_dir else None
        self._resume_from = 1  # the first stream seq not yet decided
        self._spent_floor: Progress | None = None  # after a restart, until the re-read passes seen_through
        self._retire_msgs: list[Any] = []  # acked once a record says who retired
        self._unfit: set[int] = set()  # stream seqs of a running round's updates refused when it closes
        self.inbox: UpdateInbox | None = None
        self.publisher: GlobalPublisher | None = None
        self.serving = asyncio.Event()  # set once version 0 (or the resumed version) is out

    @property
    def last_head(self) -> GlobalHead | None:
        return self.publisher.last_head if self.publisher is not None else None

    def stop(self) -> None:
        """Stop taking work; safe to call twice (the lifecycle contract)."""
        self._stop.set()

    def finish(self) -> None:
        """End the job early: stop, then announce the current version as final."""
        self._finish = True
        self._stop.set()

    def stopping(self) -> bool:
        """Stop taking work: asked to, or the job's stop condition is reached."""
        return self._stop.is_set() or self.done()

    async def run(self, initial: Weights) -> Ledger:
        spec = self.config.spec
        if self.config.limits is None:  # frames no larger than this model's can be
            self.limits = Limits.for_model(sum(t.numel() for t in initial.values()), len(initial))
            self._admission = Admission(spec, self.config.boxes, self.limits)
        nc, js = await open_target(self.config.target, f"fedjet-coordinator-{spec.job}")
        islands: IslandSourcer | None = None
        try:
            with structlog.contextvars.bound_contextvars(job=spec.job):
                self._replicas = self.config.replicas or default_replicas(nc)
                members = [COORDINATOR, *spec.clouds, *spec.observers]
                self.publisher = GlobalPublisher(
                    js, self.subjects, self.config.boxes, members,
                    max_payload=nc.max_payload, snapshot_every=self.config.snapshot_every,
                    downlink=CodecSpec.parse(spec.config.codec).down, view_every=view_cadence(spec),
                )  # fmt: skip
                self.inbox = UpdateInbox(
                    js, self.subjects, max_blob_bytes=envelope_limit(self.limits.max_frame_bytes),
                    clouds=spec.clouds, max_payload=nc.max_payload, boxes=self.config.boxes,
                )  # fmt: skip
                checkpoint = await self._prepare(js)
                islands = IslandSourcer(js, self.subjects, spec.clouds, self.metrics)
                islands.start()  # sources the clouds whose leaves keep their updates (island mode)
                if checkpoint is None:
                    self.aggregator = Aggregator(spec.strategy, initial, clouds=len(spec.clouds))
                    await self._publish([])
                else:
                    self._restore(checkpoint)
                initial = {}  # version 0's tensors go once versions replace them (the caller keeps none)
                self.serving.set()
                if spec.config.secure_agg is not None:
                    await SecureRounds(
                        self, nc, js, admission=self._admission, budget=self.budget,
                        idle_timeout_s=self.config.idle_timeout_s,
                    ).run()  # fmt: skip
                    if self._finish and not self.done():
                        await self.publisher.publish_final_marker()
                else:
                    await self._consume()
        finally:
            if islands is not None:
                await islands.stop()
            if self.inbox is not None:
                await self.inbox.close()
            await self._report_stats(nc, js)
            await close_quietly(nc)
        return self.ledger

    async def _report_stats(self, nc: Any, js: Any) -> None:
        """This process's socket bytes, lifetime and peak resident set, for the run report (the
        put itself, a few hundred bytes, is the one exchange they leave out)."""
        if not nc.is_connected:  # the broker is gone: a put would only wait out its timeouts
            log.warning("stats_not_reported", process="coordinator", error="not connected to NATS")
            return
        stats = {**socket_bytes_of(nc).figures(), "lifetime_s": process_lifetime_s(), "peak_rss_mb": peak_rss_mb()}
        await put_coordinator_stats(js, self.subjects, stats)

    async def _prepare(self, js: object) -> Checkpoint | None:
        """Streams and spec; the last checkpoint when this job ran before (a restart)."""
        spec = self.config.spec
        secure = spec.config.secure_agg is not None
        await ensure_job_streams(js, self.subjects, replicas=self._replicas, secure_agg=secure)
        follower = GlobalFollower(js, self.subjects, self.config.boxes, self.limits)
        depth = strategy_for(spec.strategy).history_depth
        checkpoint = await last_checkpoint(follower, depth)
        if self._state is not None:
            head = checkpoint.latest.head if checkpoint is not None else None
            found = None if head is None else Published(job=spec.job, version=head.version, hash=head.hash)
            check_not_behind(self._state.read(), found)
        if checkpoint is None:
            await publish_spec(js, self.subjects, spec, self.config.boxes.me)
            return None
        recorded = await read_spec(js, self.subjects, self.config.boxes.me.public)
        if recorded is None or not recorded.same_job(spec):
            raise ConfigError(f"job {spec.job!r} was started with other settings; use a new --job")
        return checkpoint

    def _restore(self, checkpoint: Checkpoint) -> None:
        head, record = checkpoint.latest.head, checkpoint.record
        spec = self.config.spec
        self.aggregator = Aggregator(spec.strategy, checkpoint.weights, head.version, clouds=len(spec.clouds))
        self.aggregator.preload(checkpoint.history)
        self.ledger = Ledger.resume(record.progress)
        self.budget = PrivacyBudget.restore(record.progress)
        self._guard = ReplayGuard(dict(record.progress.guard))
        self.pacer.assignment.update(record.assignment)
        assert self.publisher is not None and self.inbox is not None
        self.publisher.resume(checkpoint.latest, checkpoint.weights)
        self.inbox.applied_through = record.progress.applied_through
        self.inbox.resumed = record.progress
        self._spent_floor = record.progress
        self._resume_from = record.progress.resume_from
        self._batcher.retired.update(record.retired)
        log.info("coordinator_resumed", version=head.version, resume_from=record.progress.resume_from)

    async def _consume(self) -> None:
        assert self.inbox is not None and self.aggregator is not None
        await self.inbox.open(self._resume_from)
        self._batcher.start_round(time.monotonic())
        last_activity = time.monotonic()
        while not self.stopping():
            msgs = await self.inbox.fetch(timeout=0.25)
            if msgs:
                last_activity = time.monotonic()
            for expired in self.inbox.evicted(time.monotonic()):
                await self._refuse(expired)
            for msg in msgs:
                arrival = await self.inbox.receive(msg, time.monotonic())
                for evicted in self.inbox.evicted():
                    await self._refuse(evicted)
                if arrival is not None:
                    await self._on_arrival(arrival)
                await self._fold_ready()
                if self.done():
                    break
            await self._fold_ready()
            if self._batcher.everyone_retired:
                log.warning("every_cloud_retired", version=self.aggregator.version)
                self._finish = True  # the job is over: nobody will send again
                break
            if time.monotonic() - last_activity > self.config.idle_timeout_s:
                log.error("coordinator_idle_timeout", seconds=self.config.idle_timeout_s)
                break
        if self._finish and not self.done() and self.publisher is not None:
            await self.publisher.publish_final_marker()

    def done(self) -> bool:
        """The job's stop condition is reached (used by the secure rounds too)."""
        assert self.aggregator is not None
        return self.config.spec.config.stop.reached(self.aggregator.version, self.ledger.applied)

    async def _on_arrival(self, arrival: Arrival) -> None:
        if arrival.error is not None or arrival.blob is None:
            await self._refuse(arrival)
            return
        agg, admission, blob = self.aggregator, self._admission, arrival.blob
        assert agg is not None
        self._raise_guard(arrival.seq)
        with structlog.contextvars.bound_contextvars(cloud=arrival.cloud, stream_seq=arrival.seq):
            try:
                update = await asyncio.to_thread(admission.read, blob.data, arrival.cloud, self._guard)
                h = update.header
                self.ledger.authenticated(arrival.seq, h.cloud, h.worker, h.seq)
                if h.kind == RETIRE:
                    self._retire(h.cloud, arrival)
                    return
                admitted = await asyncio.to_thread(
                    admission.check, update, arrival.cloud, agg.weights, agg.admissible, self.budget
                )
                staleness = admitted.applied.staleness
                committed = Committed(h, staleness, arrival.seq, blob.wire_bytes, time.monotonic(), tuple(arrival.msgs))
                arrival.blob = blob = None  # its frame: decoded, no longer held
                if self._folds_as_it_goes():  # taken into the round's sum now; the round keeps no tensors
                    fit = await asyncio.to_thread(self._fits, admitted.applied)
                    displaced = self._batcher.offer(arrival.cloud, staleness, (admitted.applied.folded(), committed))
                    if fit:
                        await asyncio.to_thread(agg.fold, admitted.applied)
                    else:  # it reports for its cloud, and is refused when the round closes (as held rounds do)
                        self._unfit.add(arrival.seq)
                else:
                    displaced = self._batcher.offer(arrival.cloud, staleness, (admitted.applied, committed))
                del update, admitted
            except FedjetError as e:
                arrival.error = e
                await self._refuse(arrival)
                return
            log.info("update_received", staleness=staleness, base=h.base_version)
        if displaced is not None:
            _, stale = displaced
            error = StaleUpdateError(f"{arrival.cloud}'s carried stale update replaced by its fresh one")
            await self._refuse(Arrival(arrival.cloud, stale.stream_seq, list(stale.msgs), error=error))

    def _raise_guard(self, stream_seq: int) -> None:
        """Past what the last record saw, every sequence number authenticated before the
        restart is spent too (rejected ones included): until then the guard holds only the
        settled ones, so that updates still waiting in a round are admitted once more."""
        if self._spent_floor is None or stream_seq <= self._spent_floor.seen_through:
            return
        for key, seq in self._spent_floor.spent.items():
            self._guard.last[key] = max(seq, self._guard.last.get(key, 0))
        self._spent_floor = None

    def _retire(self, cloud: str, arrival: Arrival) -> None:
        """A cloud sends no more: rounds stop waiting for it; its message is acked with the
        next record (which names it), so a restart learns it again."""
        self._batcher.retire(cloud)
        self._retire_msgs += arrival.msgs
        log.warning("cloud_retired", remaining=sorted(set(self.config.spec.clouds) - self._batcher.retired))

    async def _refuse(self, arrival: Arrival) -> None:
        """A rejected message becomes data: counted, logged, acked (it will never be valid)."""
        assert arrival.error is not None and self.inbox is not None
        self.ledger.reject(arrival.error.reason, arrival.cloud, arrival.seq, str(arrival.error))
        self.metrics.rejected(arrival.error.reason)
        await self.inbox.ack(arrival.msgs)

    async def _fold_ready(self) -> None:
        while self._batcher.ready(time.monotonic()) and not self.done():
            batch = [item for _, item in self._batcher.take()]
            self._log_missing(batch)
            await self._fold(batch)

    def _log_missing(self, batch: list[Batched]) -> None:
        """A synchronous round that closes without some clouds (deadline and quorum: a cloud cut
        off, an island, or just slow) says which, in the round log."""
        if not self._batcher.synchronous:
            return
        reported = {c.header.cloud for _, c in batch}
        missing = sorted(set(self.config.spec.clouds) - reported - self._batcher.retired)
        if missing:
            assert self.aggregator is not None
            log.warning(
                "round_closed_without", version=self.aggregator.version + 1, missing=missing, quorum=len(reported)
            )

    def _folds_as_it_goes(self) -> bool:
        """Synchronous rounds of a rule that weighs each update on its own (FedAvg), where no
        update is displaced once taken (``--late drop``), are summed as updates arrive."""
        agg = self.aggregator
        assert agg is not None
        return self._batcher.synchronous and self._batcher.policy.late == "drop" and agg.can_fold()

    async def _fold(self, batch: list[Batched]) -> None:
        """Apply a batch; updates that would make the global non-finite are refused, the rest committed."""
        agg = self.aggregator
        assert agg is not None
        if self._folds_as_it_goes():
            unfit = await asyncio.to_thread(self._close_round, batch)
        else:
            unfit = await asyncio.to_thread(agg.apply_finite, [applied for applied, _ in batch])
        for _, c in (batch[i] for i in unfit):  # the last good version stays
            error = NonFiniteError(f"{c.header.cloud}'s update would make the global non-finite")
            await self._refuse(Arrival(c.header.cloud, c.stream_seq, list(c.msgs), error=error))
        committed = [c for i, (_, c) in enumerate(batch) if i not in unfit]
        if committed:
            await self.commit(committed)
        self._batcher.start_round(time.monotonic())

    def _fits(self, applied: Applied) -> bool:
        assert self.aggregator is not None
        try:
            self.aggregator.check_fold(applied)
            return True
        except NonFiniteError:
            return False

    def _close_round(self, batch: list[Batched]) -> list[int]:
        """The round's running sum becomes a version. Refused: the updates that alone would have
        made the weights non-finite (never taken in), or every update if the sum would be."""
        assert self.aggregator is not None
        unfit = [i for i, (_, c) in enumerate(batch) if c.stream_seq in self._unfit]
        self._unfit.difference_update(c.stream_seq for _, c in batch)
        if len(unfit) == len(batch):
            return unfit
        try:
            self.aggregator.close_round()
            return unfit
        except NonFiniteError:
            return list(range(len(batch)))

    async def commit(self, committed: Sequence[Committed], *, secure: SecureRecord | None = None) -> None:
        """The one commit path, for every kind of round: the aggregator made a new version from
        ``committed``; count it, meter it, feed the pacer each update's speed, publish the version
        with its record (``secure``: the round that made it), then ack what made it."""
        agg, inbox = self.aggregator, self.inbox
        assert agg is not None and inbox is not None
        self.ledger.applied_batch(committed)
        for c in committed:
            h = c.header
            log.info("update_applied", cloud=h.cloud, seq=h.seq, stream_seq=c.stream_seq, version=agg.version)
            self.metrics.applied(h.cloud, c.staleness)
            self.metrics.bytes("in", h.cloud, c.wire_bytes)
            rate = self.pacer.observe(h.cloud, h.base_version, h.tokens, h.compute_s, c.arrived)
            if rate is not None:
                self.metrics.throughput(h.cloud, rate)
        self.pacer.after_version(agg.version)
        await self._publish(committed, secure=secure)
        for c in committed:
            await inbox.ack(list(c.msgs))

    def reject(self, reason: str, cloud: str, detail: str) -> None:
        """A secure-aggregation message or round that failed: counted like a rejected update."""
        self.ledger.reject(reason, cloud, 0, detail)
        self.metrics.rejected(reason)

    async def _publish(self, committed: Sequence[Committed], *, secure: SecureRecord | None = None) -> None:
        """Publish the aggregator's newest version with the record of what made it."""
        agg, inbox, publisher = self.aggregator, self.inbox, self.publisher
        assert agg is not None and inbox is not None and publisher is not None
        waiting = [s for _, c in self._batcher.pending_items() for s in stream_seqs(list(c.msgs))]
        waiting += inbox.pending_seqs + stream_seqs(self._retire_msgs)
        record = self.ledger.record(
            agg.strategy.name, committed, waiting=waiting, assignment=self.pacer.assignment,
            seen_through=inbox.seen_through, dp_steps=self.budget.snapshot(),
        )  # fmt: skip
        running = secure is None and self._folds_as_it_goes()
        record = replace(record, retired=tuple(sorted(self._batcher.retired)), secure=secure, running_sum=running)
        record = withhold(record, self.config.boxes.me.public.box, noise_key=agg.last_noise_key)
        with structlog.contextvars.bound_contextvars(version=agg.version):
            head = await publisher.publish(agg.version, agg.hash, agg.weights, record, final=self.done())
        self.metrics.version(agg.version)
        self.metrics.bytes("out", "all", head.size)
        retire_msgs, self._retire_msgs = self._retire_msgs, []
        await inbox.ack(retire_msgs)
        self.pacer.published(agg.version, time.monotonic())
        if self._state is not None:
            self._state.write(Published(job=self.config.spec.job, version=agg.version, hash=agg.hash))


def view_cadence(spec: JobSpec) -> int:
    """Versions between changes of the workers' view: one a version, except where a version is
    one update (async), where it changes once per cloud's worth of versions, so the views the
    workers read cost about what the updates that made them did."""
    return len(spec.clouds) if spec.strategy.name == "async" else 1
