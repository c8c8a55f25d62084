"""The coordinator's running account: counters, progress, and the :class:`VersionRecord`
of each version it publishes (the typed record lives in :mod:`fedjet.codecs.record`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedjet.codecs.messages import UpdateHeader
from fedjet.codecs.record import ContributionRecord, DroppedRecord, Progress, VersionRecord
from fedjet.log import get_logger

log = get_logger("fedjet.coordinator")
MAX_DROPPED_LISTED = 64  # per version record: keeps every head far below max_payload


@dataclass(frozen=True)
class Committed:
    """One update as a version commits it, whichever path it came by: the header it was sent
    with (who, and what it claimed), the staleness it was folded with, where it sat in the update
    stream (0: it came through a secure round, not the stream), the bytes it cost on the wire,
    when it arrived (the pacer's clock), and the messages to ack once the version is out."""

    header: UpdateHeader
    staleness: int
    stream_seq: int
    wire_bytes: int
    arrived: float
    msgs: tuple[Any, ...] = ()

    def to_record(self) -> ContributionRecord:
        h = self.header
        return ContributionRecord(
            cloud=h.cloud,
            worker=h.worker,
            seq=h.seq,
            stream_seq=self.stream_seq,
            base=h.base_version,
            staleness=self.staleness,
            samples=h.samples,
            loss=h.loss,
            wire_bytes=self.wire_bytes,
            tokens=h.tokens,
            compute_s=h.compute_s,
            heldout_loss=h.heldout_loss,
            dp=h.dp,
        )


@dataclass
class Ledger:
    """What the coordinator has decided so far; each version's record carries a snapshot."""

    applied: int = 0
    applied_through: int = 0  # every update blob ending at or before this seq is decided
    guard: dict[str, int] = field(default_factory=dict)  # last authenticated seq per cloud/worker, decided
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: list[DroppedRecord] = field(default_factory=list)
    spent: list[tuple[int, str, int]] = field(default_factory=list)  # (stream seq, cloud/worker, seq)

    @classmethod
    def resume(cls, progress: Progress) -> Ledger:
        return cls(progress.applied_total, progress.applied_through, dict(progress.guard), dict(progress.rejected))

    def authenticated(self, stream_seq: int, cloud: str, worker: str, seq: int) -> None:
        """An update that authenticated has spent its sequence number, whatever its fate. The
        record's guard takes it once everything up to its stream position is decided (a
        restart skips that far), so a rejected update cannot come back after a restart."""
        self.spent.append((stream_seq, f"{cloud}/{worker}", seq))

    def reject(self, reason: str, cloud: str, seq: int, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if len(self.dropped) < MAX_DROPPED_LISTED:  # the counts are complete; the list is a sample
            self.dropped.append(DroppedRecord(stream_seq=seq, cloud=cloud, reason=reason))
        log.warning("update_rejected", reason=reason, cloud=cloud, stream_seq=seq, detail=detail[:300])

    def applied_batch(self, committed: Sequence[Committed]) -> None:
        self.applied += len(committed)
        for c in committed:
            key = f"{c.header.cloud}/{c.header.worker}"
            self.guard[key] = max(c.header.seq, self.guard.get(key, 0))
            self.applied_through = max(self.applied_through, c.stream_seq)
        settled = [s for s in self.spent if s[0] <= self.applied_through]
        self.spent = [s for s in self.spent if s[0] > self.applied_through]
        for _, key, seq in settled:
            self.guard[key] = max(seq, self.guard.get(key, 0))

    def spent_max(self) -> dict[str, int]:
        """The highest authenticated seq per cloud/worker, settled or not."""
        out = dict(self.guard)
        for _, key, seq in self.spent:
            out[key] = max(seq, out.get(key, 0))
        return out

    def record(
        self,
        strategy: str,
        committed: Sequence[Committed],
        *,
        waiting: list[int],
        assignment: dict[str, int],
        seen_through: int = 0,
        dp_steps: Mapping[str, int],
    ) -> VersionRecord:
        """The record of a version made from ``committed`` (in the order they were folded);
        ``waiting`` are stream seqs still undecided (where a restart must read from), and every
        other seq up to ``seen_through`` (the last one the coordinator took in) is decided;
        ``dp_steps`` is the privacy budget's snapshot (the DP steps each cloud claimed, in all)."""
        samples = sum(c.header.samples for c in committed)
        loss = sum(c.header.loss * c.header.samples for c in committed)
        seen_through = max(seen_through, self.applied_through)
        progress = Progress(
            applied_total=self.applied,
            applied_through=self.applied_through,
            resume_from=min([*waiting, self.applied_through + 1]),
            guard=dict(self.guard),
            rejected=dict(self.rejected),
            seen_through=seen_through,
            waiting=tuple(sorted({s for s in waiting if self.applied_through < s <= seen_through})),
            spent=self.spent_max(),
            dp_steps=dict(dp_steps),
        )
        record = VersionRecord(
            strategy=strategy,
            contributions=tuple(c.to_record() for c in committed),
            train_loss=loss / samples if samples else None,
            bytes_up=sum(c.wire_bytes for c in committed),
            published_unix=time.time(),
            rejected_total=sum(self.rejected.values()),
            dropped=tuple(self.dropped),
            assignment=dict(assignment),
            progress=progress,
        )
        self.dropped = []
        return record
