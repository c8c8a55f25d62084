"""The coordinator's loop under ``--secure-agg``: rounds of masked updates, not the update stream.

Each round is a :class:`SecureRound` on the current version; a completed one yields the
survivors' weighted average, applied as one contribution, and the round's transcript, sealed to
the coordinator and published before the version that it made, so ``fedjet replay --verify``
can recompute every sum. The survivors' updates are then committed like any batch's (the
coordinator's one commit path, seen through :class:`~fedjet.coordinator.committer.Committer`).
An aborted attempt is counted and the next one opens at once.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import msgpack  # type: ignore[import-untyped]

from fedjet.broker.blobs import PublishedBlob, publish_blob
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.secagg import SecAggLink, secagg_max_bytes
from fedjet.codecs.crypto import COORDINATOR, seal_secagg
from fedjet.codecs.messages import UpdateHeader
from fedjet.codecs.record import SecureRecord
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.committer import Committer
from fedjet.coordinator.privacy_check import PrivacyBudget
from fedjet.coordinator.record import Committed
from fedjet.coordinator.secure_round import RoundIdle, SecureOutcome, SecureRound, by_samples, by_staleness
from fedjet.coordinator.secure_sum import secure_contribution, transcript_blob_id
from fedjet.coordinator.strategies import Aggregator, Applied
from fedjet.errors import BlobError, Terminated
from fedjet.log import get_logger
from fedjet.secagg import SecAggError
from fedjet.secagg.fixedpoint import FixedPoint
from fedjet.secagg.steps import ATTEMPTS

log = get_logger("fedjet.coordinator")
TRANSCRIPT_TRIES = 3


class SecureRounds:
    """Rounds until ``host`` says stop. Each advertised header goes through ``admission`` (its
    privacy claim charged to ``budget``), and each completed round through ``host.commit``."""

    def __init__(
        self, host: Committer, nc: Any, js: Any, *, admission: Admission, budget: PrivacyBudget, idle_timeout_s: float
    ) -> None:
        self.host = host
        self.nc = nc
        self.js = js
        self.admission = admission
        self.budget = budget
        self.idle_timeout_s = idle_timeout_s
        spec = self.spec = admission.spec
        self.subjects = JobSubjects(spec.job)
        config = spec.config.secure_agg_config
        assert config is not None
        self.config = config
        self.numel = config.numel_masked(sum(t.numel() for t in self._aggregator().weights.values()))
        self.link = SecAggLink(
            js, self.subjects, admission.boxes, peers=spec.clouds,
            max_bytes=secagg_max_bytes(len(spec.clouds), self.numel), max_payload=nc.max_payload,
            on_reject=lambda reason, detail: host.reject(reason, "?", detail),
        )  # fmt: skip
        self.verify_keys = {c: admission.boxes.public_of(c).verify for c in spec.clouds}
        strategy = spec.strategy
        max_weight = FixedPoint.for_job(config).max_weight(len(spec.clouds))
        if strategy.name == "fedbuff":
            self.weighing = by_staleness(strategy.staleness, strategy.max_staleness, strategy.buffer_size, max_weight)
        else:
            self.weighing = by_samples(len(spec.clouds), max_weight)

    def _aggregator(self) -> Aggregator:
        agg = self.host.aggregator
        assert agg is not None, "secure rounds start once the job's first version is out"
        return agg

    def _round(self, attempt: int) -> SecureRound:
        agg, spec = self._aggregator(), self.spec
        return SecureRound(
            self.link, job=spec.job, clouds=spec.clouds, config=self.config,
            base_version=agg.version, base_hash=agg.hash, weighing=self.weighing,
            attempt=attempt % ATTEMPTS, numel=self.numel,
            verify_keys=self.verify_keys, check_header=self._check_header, on_reject=self.host.reject,
            stopping=self.host.stopping, idle_timeout_s=self.idle_timeout_s,
        )  # fmt: skip

    async def run(self) -> None:
        await self.link.start()
        attempt, aborted = secrets.randbelow(ATTEMPTS // 2), 0  # fresh round ids after a restart too
        try:
            while not self.host.stopping():
                secure_round = self._round(attempt)
                attempt += 1
                try:
                    outcome = await secure_round.run()
                except Terminated:
                    break
                except RoundIdle:
                    log.error("coordinator_idle_timeout", seconds=self.idle_timeout_s)
                    break
                except SecAggError as e:
                    self.host.reject(e.reason, "round", str(e))
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
                    self.js, self.subjects.secagg_transcript, sealed, blob_id=transcript_blob_id(round_id),
                    max_payload=self.nc.max_payload, refuse_duplicate=True,
                )  # fmt: skip
            except BlobError as e:
                self.host.reject(e.reason, "transcript", str(e))
                if tries == TRANSCRIPT_TRIES:
                    raise
        raise AssertionError("unreachable")

    def _check_header(self, header: UpdateHeader, cloud: str) -> None:
        """A secure round's update header: admitted as a plain update's is, short of its tensors."""
        self.admission.check_header(header, self.budget)

    async def _fold(self, outcome: SecureOutcome, aborted: int) -> bool:
        """Apply the unmasked average as one contribution and commit the survivors' updates
        with the round's record: who was in it and where its transcript is (published first,
        so every recorded version can be re-checked)."""
        agg = self._aggregator()
        headers = list(outcome.headers.values())
        base_version = agg.version
        total = secure_contribution(
            outcome.average, job=self.spec.job, base_version=base_version, base_hash=agg.hash,
            numel_masked=self.numel, template=agg.weights, members=[(h.samples, h.loss) for h in headers],
        )  # fmt: skip
        if await asyncio.to_thread(agg.apply_finite, [Applied(total, 0)]):
            self.host.reject("NonFiniteError", "round", "the secure sum would make the global non-finite")
            return False
        packed = msgpack.packb(outcome.transcript.to_wire(), use_bin_type=True)
        blob = await self._publish_transcript(outcome.round_id, seal_secagg(packed, self.admission.boxes, COORDINATOR))
        committed = [
            Committed(h, staleness=base_version - h.base_version, stream_seq=0,
                      wire_bytes=outcome.member_bytes.get(h.cloud, 0), arrived=outcome.arrived[h.cloud])
            for h in headers
        ]  # fmt: skip
        secure = SecureRecord(
            round_id=outcome.round_id, numel=self.numel, survivors=outcome.survivors, dropped=outcome.dropped,
            weights=outcome.weights, weight_total=outcome.weight_total, transcript_first=blob.first_seq,
            transcript_last=blob.last_seq, aborted=aborted,
        )  # fmt: skip
        await self.host.commit(committed, secure=secure)
        return True
