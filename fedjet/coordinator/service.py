"""The coordinator service: consume -> decode -> validate -> aggregate -> publish -> ack.

Updates are read from a durable pull consumer and handled strictly in JetStream sequence
order (a chunked update takes the place of its last chunk). Each message is acked only once
the global version that includes it has been published (stored by JetStream), so a crash
never loses an update. Anything malformed, forged, stale or oversized is rejected, counted and
logged; it never stops the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from fedjet.broker.blobs import H_BLOB, Blob, BlobAssembler, part_index, publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import COORDINATOR, Boxes, ReplayGuard, digest, seal_global
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import (
    GlobalHead,
    GlobalHeader,
    GlobalVersion,
    Update,
    encode_global,
    encode_meta,
    open_sealed_update,
    peek_global_header,
)
from fedjet.coordinator.aggregate import Weights
from fedjet.coordinator.checkpoint import Checkpoint, Progress, last_checkpoint
from fedjet.coordinator.record import Received, version_record
from fedjet.coordinator.rounds import Batcher, RoundPolicy
from fedjet.coordinator.strategies import Aggregator, Applied, StrategyConfig
from fedjet.coordinator.validate import to_contribution
from fedjet.data.partition import split_steps
from fedjet.errors import BlobError, BrokerError, ConfigError, FedjetError, StaleUpdateError
from fedjet.follow import GlobalFollower
from fedjet.log import get_logger
from fedjet.spec import JobSpec, sign_spec, verify_spec

log = get_logger("fedjet.coordinator")
MAX_DROPPED_LISTED = 64  # per version record: keeps every head far below max_payload


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    nats_url: str
    spec: JobSpec
    boxes: Boxes
    strategy: StrategyConfig
    policy: RoundPolicy
    rounds: int | None = 5
    max_updates: int | None = None
    limits: Limits = field(default_factory=Limits)
    idle_timeout_s: float = 600.0
    rebalance_every: int = 1
    snapshot_every: int = 8  # full weights every N versions; lossless deltas in between

    def __post_init__(self) -> None:
        if self.rounds is None and self.max_updates is None:
            raise ConfigError("give --rounds or --max-updates (or both) to bound the run")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        if self.max_updates is not None and self.max_updates < 1:
            raise ConfigError("--max-updates must be >= 1")
        if self.rebalance_every < 1 or self.snapshot_every < 1:
            raise ConfigError("--rebalance-every and snapshot_every must be >= 1")


@dataclass
class Counters:
    applied: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, reason: str, cloud: str, seq: int, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if len(self.dropped) < MAX_DROPPED_LISTED:  # the counts are complete; the list is a sample
            self.dropped.append({"stream_seq": seq, "cloud": cloud, "reason": reason})
        log.warning("update_rejected", reason=reason, cloud=cloud, stream_seq=seq, detail=detail[:300])


class Coordinator:
    """Run with ``await Coordinator(cfg).run(initial_weights)``; ``stop()`` ends it cleanly."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.subjects = JobSubjects(config.spec.job)
        self.counters = Counters()
        self.aggregator: Aggregator | None = None
        self._stop = asyncio.Event()
        self._batcher: Batcher[Received] = Batcher(
            mode="sync" if config.strategy.synchronous else "buffer",
            policy=config.policy,
            size=1 if config.strategy.name == "async" else config.strategy.buffer_size,
        )
        self._assembler = BlobAssembler(
            max_blob_bytes=config.limits.max_frame_bytes, max_pending_bytes=config.limits.max_frame_bytes * 2
        )
        self._replay = ReplayGuard()
        self._throughput: dict[str, float] = {}
        self._assignment: dict[str, int] = {}
        self._held: dict[tuple[str, str], list[Any]] = {}  # (subject, blob id) -> chunks to ack later
        self._published: Weights | None = None
        self.progress = Progress()
        self._last_head_seq = 0
        self._nc: Any = None
        self._sub: Any = None
        self._js: Any = None
        self.last_head: GlobalHead | None = None

    def stop(self) -> None:
        """End the job early: the consume loop stops and a final marker tells workers to exit.
        Safe to call twice. (SIGTERM instead cancels the task: no marker, so the same command
        resumes the job later.)"""
        self._stop.set()

    async def run(self, initial: Weights) -> Counters:
        self._nc = await connect(self.config.nats_url, f"fedjet-coordinator-{self.config.spec.job}")
        try:
            self._js = self._nc.jetstream()
            checkpoint = await self._prepare()
            if checkpoint is None:
                self.aggregator = Aggregator(self.config.strategy, initial)
                await self._publish(self._meta([]), final=False)
            else:
                self._restore(checkpoint)
            await self._consume()
        finally:
            await self._close()
        return self.counters

    async def _prepare(self) -> Checkpoint | None:
        """Streams and spec; the last checkpoint when this job ran before (a restart)."""
        await ensure_job_streams(self._js, self.subjects)
        self._assignment = {c: int(self.config.spec.train["local_steps"]) for c in self.config.spec.clouds}
        kv = await self._js.key_value(self.subjects.kv_bucket)
        follower = GlobalFollower(self._js, self.subjects, self.config.boxes, self.config.limits)
        keep = self.config.strategy.max_staleness + 1 if self.config.strategy.name == "async" else 1
        checkpoint = await last_checkpoint(self._js, self.subjects, follower, keep)
        if checkpoint is not None:
            recorded = verify_spec((await kv.get("spec")).value, self.config.boxes.me.public)
            if recorded.to_bytes() != self.config.spec.to_bytes():
                raise ConfigError(f"job {self.config.spec.job!r} was started with other settings; use a new --job")
            return checkpoint
        await kv.put("spec", sign_spec(self.config.spec, self.config.boxes.me))
        return None

    def _restore(self, checkpoint: Checkpoint) -> None:
        self.aggregator = Aggregator(self.config.strategy, checkpoint.weights, checkpoint.head.version)
        self.aggregator.preload(checkpoint.history)
        self.progress = checkpoint.progress
        self.counters.applied = self.progress.applied_total
        self.counters.rejected = dict(self.progress.rejected)
        self._replay = ReplayGuard(dict(self.progress.guard))
        self._assignment = {k: int(v) for k, v in checkpoint.meta.get("assignment", self._assignment).items()}
        self._published = checkpoint.weights
        self._last_head_seq = checkpoint.head_seq
        self.last_head = checkpoint.head
        log.info("coordinator_resumed", version=checkpoint.head.version, resume_from=self.progress.resume_from)

    async def _consume(self) -> None:
        # A fresh durable from where the record says work is undecided: messages a killed
        # coordinator held unacked come again now, not after the ack wait.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.subjects.update_stream, self.subjects.coordinator_durable)
        config = api.ConsumerConfig(
            durable_name=self.subjects.coordinator_durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=3600.0,
            max_ack_pending=100_000,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.progress.resume_from,
            filter_subject=self.subjects.updates,
        )
        self._sub = sub = await self._js.pull_subscribe(
            self.subjects.updates, durable=self.subjects.coordinator_durable, config=config
        )
        self._batcher.start_round(time.monotonic())
        last_activity = time.monotonic()
        while not self._stop.is_set() and not self._done():
            try:
                msgs = await sub.fetch(64, timeout=0.25)
                last_activity = time.monotonic()
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            for msg in msgs:
                await self._on_message(msg)
                await self._fold_ready()
                if self._done():
                    break
            await self._fold_ready()
            if time.monotonic() - last_activity > self.config.idle_timeout_s:
                log.error("coordinator_idle_timeout", seconds=self.config.idle_timeout_s)
                break
        if not self._done() and self.last_head is not None:
            await self._publish_final_marker()

    def _done(self) -> bool:
        agg, cfg = self.aggregator, self.config
        assert agg is not None
        if cfg.max_updates is not None and self.counters.applied >= cfg.max_updates:
            return True
        return cfg.rounds is not None and agg.version >= cfg.rounds

    async def _on_message(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        cloud = JobSubjects.cloud_of(msg.subject)
        key = (msg.subject, (msg.headers or {}).get(H_BLOB, ""))
        decided = seq <= self.progress.applied_through  # seen by the coordinator before a restart
        if decided and part_index(msg.headers) != 0 and not self._assembler.is_pending(key):
            await _ack(msg)  # the tail of a blob that was decided before the restart
            return
        try:
            blob = self._assembler.add(msg.subject, msg.headers, msg.data, seq)
        except FedjetError as e:
            msgs = [*self._held.pop(key, []), msg]
            if decided:  # rejected (and counted) before the restart
                for m in msgs:
                    await _ack(m)
                return
            await self._reject(e, cloud, seq, msgs)
            return
        await self._ack_evicted()
        if blob is None:
            self._held.setdefault(key, []).append(msg)
            return
        msgs = [*self._held.pop(key, []), msg]
        if blob.last_seq <= self.progress.applied_through:  # decided before a restart
            for m in msgs:
                await _ack(m)
            return
        try:
            received = await self._admit(blob, cloud, msgs)
            displaced = self._batcher.offer(cloud, received.applied.staleness, received)
        except FedjetError as e:
            await self._reject(e, cloud, blob.last_seq, msgs)
            return
        if displaced is not None:
            error = StaleUpdateError(f"{cloud}'s carried stale update replaced by its fresh one")
            await self._reject(error, cloud, displaced.stream_seq, displaced.msgs)

    async def _reject(self, error: FedjetError, cloud: str, seq: int, msgs: list[Any]) -> None:
        """A rejected message becomes data: counted, logged, acked (it will never be valid)."""
        self.counters.reject(error.reason, cloud, seq, str(error))
        for m in msgs:
            await _ack(m)

    async def _ack_evicted(self) -> None:
        for key, seqs in self._assembler.evicted:
            msgs = self._held.pop(key, [])
            error = BlobError(f"partial blob {key[1][:64]} evicted from the reassembly buffer")
            await self._reject(error, "?", seqs[-1] if seqs else 0, msgs)
        self._assembler.evicted.clear()

    async def _admit(self, blob: Blob, cloud: str, msgs: list[Any]) -> Received:
        update = await asyncio.to_thread(open_sealed_update, blob.data, self.config.boxes, cloud, self.config.limits)
        self._replay.check(update.header.cloud, update.header.worker, update.header.seq)
        agg = self.aggregator
        assert agg is not None
        contribution = to_contribution(update, cloud, self.config.spec, self.config.strategy, agg.weights)
        staleness = agg.admissible(update.header.base_version)
        self._note_throughput(update)
        log.info(
            "update_received",
            cloud=cloud,
            seq=update.header.seq,
            base=update.header.base_version,
            staleness=staleness,
            loss=round(update.header.loss, 4),
            wire_bytes=blob.wire_bytes,
        )
        return Received(update, Applied(contribution, staleness), blob.last_seq, blob.wire_bytes, msgs)

    def _note_throughput(self, update: Update) -> None:
        h = update.header
        if h.compute_s > 0 and h.tokens > 0:
            rate = h.tokens / h.compute_s
            old = self._throughput.get(h.cloud)
            self._throughput[h.cloud] = rate if old is None else 0.5 * old + 0.5 * rate

    async def _fold_ready(self) -> None:
        try:
            while self._batcher.ready(time.monotonic()) and not self._done():
                await self._fold(self._batcher.take())
        except FedjetError as e:
            log.error("aggregation_failed", error=str(e))
            raise

    async def _fold(self, batch: list[tuple[int, Received]]) -> None:
        agg = self.aggregator
        assert agg is not None
        received = [r for _, r in batch]
        await asyncio.to_thread(agg.apply, [r.applied for r in received])
        self.counters.applied += len(received)
        for r in received:
            h = r.update.header
            self.progress.guard[f"{h.cloud}/{h.worker}"] = max(
                h.seq, self.progress.guard.get(f"{h.cloud}/{h.worker}", 0)
            )
            self.progress.applied_through = max(self.progress.applied_through, r.stream_seq)
        if self.config.spec.partition == "dynamic" and agg.version % self.config.rebalance_every == 0:
            self._rebalance()
        await self._publish(self._meta(received), final=self._done())
        for r in received:
            for m in r.msgs:
                await _ack(m)
        self._batcher.start_round(time.monotonic())

    def _rebalance(self) -> None:
        spec = self.config.spec
        if len(self._throughput) < len(spec.clouds):
            return
        total = int(spec.train["local_steps"]) * len(spec.clouds)
        self._assignment = split_steps(self._throughput, total)
        log.info("rebalanced", assignment=self._assignment)

    def _meta(self, received: list[Received]) -> dict[str, Any]:
        record = version_record(
            self.config.strategy.name,
            received,
            rejected_total=sum(self.counters.rejected.values()),
            dropped=self.counters.dropped,
            assignment=dict(self._assignment),
            **self._progress_meta(),
        )
        self.counters.dropped = []
        return record

    def _progress_meta(self) -> dict[str, Any]:
        """Progress as of this version: what a restarted coordinator needs to carry on."""
        waiting = [s for r in self._batcher.pending_items() for s in _seqs(r.msgs)]
        waiting += self._assembler.pending_seqs
        self.progress.applied_total = self.counters.applied
        self.progress.rejected = dict(self.counters.rejected)
        self.progress.resume_from = min([*waiting, self.progress.applied_through + 1])
        return self.progress.to_meta()

    async def _publish(self, meta: dict[str, Any], *, final: bool) -> GlobalHead:
        agg = self.aggregator
        assert agg is not None
        spec = self.config.spec
        header = GlobalHeader(job=spec.job, version=agg.version, hash=agg.hash, final=final)
        base = self._delta_base(agg.version)
        payload = await asyncio.to_thread(
            encode_global, GlobalVersion(header, agg.weights), base, agg.version - 1 if base is not None else -1
        )
        self._published = agg.weights
        members = [COORDINATOR, *spec.clouds, *spec.observers]  # the coordinator too: replay reads it
        sealed = await asyncio.to_thread(seal_global, payload, encode_meta(meta), self.config.boxes, members)
        blob = await publish_blob(
            self._js,
            self.subjects.global_data,
            sealed.ciphertext,
            blob_id=f"{spec.job}/g/{agg.version}/{secrets.token_hex(6)}",  # fresh after a restart too
            max_payload=self._nc.max_payload,
        )
        head = GlobalHead(
            job=spec.job,
            version=agg.version,
            hash=agg.hash,
            final=final,
            first_seq=blob.first_seq,
            last_seq=blob.last_seq,
            size=len(sealed.ciphertext),
            sha256=digest(sealed.ciphertext),
            keys=sealed.keys,
            meta=sealed.meta,
            delta_from=peek_global_header(payload, self.config.limits).delta_from,
            prev_head_seq=self._last_head_seq,
        )
        await self._publish_head(head)
        log.info("global_published", version=agg.version, hash=agg.hash[:12], bytes=blob.wire_bytes, final=final)
        return head

    def _delta_base(self, version: int) -> Weights | None:
        """The previous version's weights, unless a full snapshot is due (bounds the chain a
        late joiner walks back)."""
        if self._published is None or version % self.config.snapshot_every == 0:
            return None
        return self._published

    async def _publish_head(self, head: GlobalHead) -> None:
        try:
            ack = await self._js.publish(
                self.subjects.global_head,
                head.sign(self.config.boxes.me),
                headers={"Nats-Msg-Id": f"{head.job}/h/{head.version}/{int(head.final)}"},
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise BrokerError(f"publishing global head {head.version} failed: {e}") from e
        self.last_head = head
        self._last_head_seq = ack.seq

    async def _publish_final_marker(self) -> None:
        """Stopped early: re-announce the current version as final so workers exit."""
        head = self.last_head
        assert head is not None
        if not head.final:
            await self._publish_head(replace(head, final=True))  # same weights, final flag set

    async def _close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
        await close_quietly(self._nc)


def _seqs(msgs: list[Any]) -> list[int]:
    return [m.metadata.sequence.stream for m in msgs]


async def _ack(msg: Any) -> None:
    try:
        await msg.ack()
    except (nats.errors.Error, nats.js.errors.Error) as e:
        log.warning("ack_failed", error=str(e))
