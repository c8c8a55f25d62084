"""The coordinator's loop under ``--secure-agg``: rounds of masked updates, not the update stream.

Each round is a :class:`SecureRound` on the current version; a completed one yields the
survivors' weighted average, applied as one contribution, and the round's transcript, sealed to
the coordinator and published before the version that it made, so ``fedjet replay --verify``
can recompute every sum. An aborted attempt is counted and the next one opens at once.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]

from fedjet.broker.blobs import PublishedBlob, publish_blob
from fedjet.channel.secagg import SecAggLink, secagg_max_bytes
from fedjet.codecs.crypto import COORDINATOR, seal_secagg
from fedjet.codecs.messages import Update, UpdateHeader
from fedjet.codecs.record import SecureRecord
from fedjet.coordinator.aggregate import Contribution
from fedjet.coordinator.record import Received
from fedjet.coordinator.secure_round import RoundIdle, SecureOutcome, SecureRound, by_samples, by_staleness
from fedjet.coordinator.secure_sum import secure_contribution, transcript_blob_id
from fedjet.coordinator.strategies import Applied
from fedjet.coordinator.validate import check_claims
from fedjet.errors import BlobError, Terminated, ValidationError
from fedjet.log import get_logger
from fedjet.secagg import SecAggError
from fedjet.secagg.steps import ATTEMPTS

if TYPE_CHECKING:
    from fedjet.coordinator.service import Coordinator

log = get_logger("fedjet.coordinator")
TRANSCRIPT_TRIES = 3


class SecureRounds:
    def __init__(self, coordinator: Coordinator, nc: Any, js: Any) -> None:
        self.c = coordinator
        self.nc = nc
        self.js = js
        spec = coordinator.config.spec
        config = spec.config.secure_agg_config
        assert config is not None and coordinator.aggregator is not None
        self.config = config
        self.numel = config.numel_masked(sum(t.numel() for t in coordinator.aggregator.weights.values()))
        self.link = SecAggLink(
            js, coordinator.subjects, coordinator.config.boxes, peers=spec.clouds,
            max_bytes=secagg_max_bytes(len(spec.clouds), self.numel), max_payload=nc.max_payload,
            on_reject=lambda reason, detail: coordinator.reject_step(reason, "?", detail),
        )  # fmt: skip
        self.verify_keys = {c: coordinator.config.boxes.public_of(c).verify for c in spec.clouds}
        strategy = spec.strategy
        max_weight = config.fixed_point.max_weight(len(spec.clouds))
        if strategy.name == "fedbuff":
            self.weighing = by_staleness(strategy.staleness, strategy.max_staleness, strategy.buffer_size, max_weight)
        else:
            self.weighing = by_samples(len(spec.clouds), max_weight)

    async def run(self) -> None:
        c, spec = self.c, self.c.config.spec
        assert c.aggregator is not None
        await self.link.start()
        attempt, aborted = secrets.randbelow(ATTEMPTS // 2), 0  # fresh round ids after a restart too
        try:
            while not c.stopping.is_set() and not c.done():
                secure_round = SecureRound(
                    self.link, job=spec.job, clouds=spec.clouds, config=self.config,
                    base_version=c.aggregator.version, base_hash=c.aggregator.hash, weighing=self.weighing,
                    attempt=attempt % ATTEMPTS, numel=self.numel,
                    verify_keys=self.verify_keys, check_header=self._check_header, on_reject=c.reject_step,
                    stopping=c.stopping.is_set, idle_timeout_s=c.config.idle_timeout_s,
                )  # fmt: skip
                attempt += 1
                try:
                    outcome = await secure_round.run()
                except Terminated:
                    break
                except RoundIdle:
                    log.error("coordinator_idle_timeout", seconds=c.config.idle_timeout_s)
                    break
                except SecAggError as e:
                    c.reject_step(e.reason, "round", str(e))
                    await secure_round.abort_members(str(e))
                    aborted += 1
                    continue
                if await self._fold(outcome, aborted):
                    aborted = 0
        finally:
            await self.link.stop()

    async def _publish_transcript(self, round_id: int, sealed: bytes) -> PublishedBlob:
        """Under a fresh random id; a chunk someone else stored first under it (a duplicate ack)
        is refused by ``publish_blob``, and the transcript goes out again under a new id."""
        for tries in range(1, TRANSCRIPT_TRIES + 1):
            try:
                return await publish_blob(
                    self.js, self.c.subjects.secagg_transcript, sealed, blob_id=transcript_blob_id(round_id),
                    max_payload=self.nc.max_payload, refuse_duplicate=True,
                )  # fmt: skip
            except BlobError as e:
                self.c.reject_step(e.reason, "transcript", str(e))
                if tries == TRANSCRIPT_TRIES:
                    raise
        raise AssertionError("unreachable")

    def _check_header(self, header: UpdateHeader, cloud: str) -> None:
        """A secure round's update header: the same claims checks as a plain update's."""
        spec = self.c.config.spec
        if header.kind != spec.update_kind:
            raise ValidationError(f"strategy {spec.strategy.name} takes {spec.update_kind} updates, got {header.kind}")
        check_claims(header, spec)
        self.c.check_privacy(Update(header, {}))

    async def _fold(self, outcome: SecureOutcome, aborted: int) -> bool:
        """Apply the unmasked average as one contribution; record who was in it and where the
        transcript is (published first, so every recorded version can be re-checked)."""
        c = self.c
        agg = c.aggregator
        assert agg is not None
        headers = list(outcome.headers.values())
        base_version = agg.version
        total = secure_contribution(
            outcome.average, job=c.config.spec.job, base_version=base_version, base_hash=agg.hash,
            numel_masked=self.numel, template=agg.weights, members=[(h.samples, h.loss) for h in headers],
        )  # fmt: skip
        if await asyncio.to_thread(agg.apply_finite, [Applied(total, 0)]):
            c.reject_step("NonFiniteError", "round", "the secure sum would make the global non-finite")
            return False
        packed = msgpack.packb(outcome.transcript.to_wire(), use_bin_type=True)
        blob = await self._publish_transcript(outcome.round_id, seal_secagg(packed, c.config.boxes, COORDINATOR))
        received = [
            Received(Update(h, {}), Applied(Contribution(h.cloud, h.base_version, h.samples, h.loss, {}),
                                            base_version - h.base_version), 0, outcome.member_bytes.get(h.cloud, 0), [])
            for h in headers
        ]  # fmt: skip
        c.ledger.applied_batch(received)
        for r in received:
            c.metrics.applied(r.update.header.cloud, r.applied.staleness)
            c.metrics.bytes("in", r.update.header.cloud, r.wire_bytes)
        secure = SecureRecord(
            round_id=outcome.round_id, numel=self.numel, survivors=outcome.survivors, dropped=outcome.dropped,
            weights=outcome.weights, weight_total=outcome.weight_total, transcript_first=blob.first_seq,
            transcript_last=blob.last_seq, aborted=aborted,
        )  # fmt: skip
        await c.publish_version(received, secure=secure)
        return True
