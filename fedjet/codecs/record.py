"""The version record: the coordinator's account of one global version, typed and versioned.

It travels encrypted inside the version's signed head and is the contract for three readers:
the observer builds the report from it, ``fedjet replay`` re-applies the batches it lists, and
a restarted coordinator resumes from its progress. Decoding is tolerant (unknown keys are
ignored, so newer coordinators can add fields) but strict on types. Records of the first batch
(progress fields at the top level, no ``record_version``) are read as version 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack  # type: ignore[import-untyped]

from fedjet.codecs.messages import DPClaim
from fedjet.config.wire import WireError, from_wire, to_wire
from fedjet.errors import DecodeError, SchemaError

RECORD_VERSION = 2
MAX_RECORD_BYTES = 1 << 20
_PROGRESS_KEYS = ("applied_total", "applied_through", "resume_from", "guard", "rejected")


@dataclass(frozen=True, kw_only=True)
class ContributionRecord:
    """One update folded into the version, in the order it was folded."""

    cloud: str
    worker: str = "0"
    seq: int
    stream_seq: int
    base: int
    staleness: int
    samples: int
    loss: float
    wire_bytes: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    heldout_loss: float | None = None  # the cloud's loss on its own held-out slice
    dp: DPClaim | None = None  # a DP job's privacy spent by that cloud so far


@dataclass(frozen=True, kw_only=True)
class DroppedRecord:
    stream_seq: int
    cloud: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Progress:
    """What a restarted coordinator needs to carry on exactly once."""

    applied_total: int = 0
    applied_through: int = 0  # every update blob ending at or before this seq is decided
    resume_from: int = 1  # first stream seq still needed (unapplied or partial blobs)
    guard: dict[str, int] = field(default_factory=dict)  # last seq per cloud/worker
    rejected: dict[str, int] = field(default_factory=dict)
    # Exactly once past applied_through: every stream seq up to seen_through is decided
    # (applied or rejected, and counted) unless listed in waiting; spent is the highest
    # authenticated seq per cloud/worker up to seen_through, rejected ones included.
    seen_through: int = 0
    waiting: tuple[int, ...] = ()
    spent: dict[str, int] = field(default_factory=dict)
    # DP: the steps each cloud has claimed in all (any worker of it): the privacy ledger that a
    # restarted coordinator keeps enforcing and a restarted worker starts from.
    dp_steps: dict[str, int] = field(default_factory=dict)

    def decided(self, stream_seq: int) -> bool:
        """Whether a restart must skip ``stream_seq``: it was applied or rejected before."""
        if stream_seq <= self.applied_through:
            return True
        return stream_seq <= self.seen_through and stream_seq not in self.waiting


@dataclass(frozen=True, kw_only=True)
class SecureRecord:
    """A version made by secure aggregation: who was in the sum, and where its transcript is."""

    round_id: int
    numel: int  # the agreed coordinates that were masked
    survivors: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)  # the survivors' agreed weights
    weight_total: float = 0.0  # what the sum was divided by (0: the weights' sum)
    transcript_first: int = 0  # stream seqs of the sealed transcript in the SECAGG stream
    transcript_last: int = 0
    aborted: int = 0  # attempts on the same base that ended below the threshold


@dataclass(frozen=True, kw_only=True)
class WithheldLoss:
    loss: float
    heldout: float | None = None


@dataclass(frozen=True, kw_only=True)
class CoordinatorOnly:
    """The part of a record sealed to the coordinator alone (see :mod:`fedjet.codecs.withheld`)."""

    noise_key: bytes = b""  # central DP: the key of this version's noise stream, for replay --verify
    losses: tuple[WithheldLoss, ...] = ()  # per contribution, in order
    train_loss: float | None = None


@dataclass(frozen=True, kw_only=True)
class VersionRecord:
    strategy: str
    contributions: tuple[ContributionRecord, ...] = ()
    train_loss: float | None = None
    bytes_up: int = 0
    published_unix: float = 0.0
    rejected_total: int = 0
    dropped: tuple[DroppedRecord, ...] = ()
    assignment: dict[str, int] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    retired: tuple[str, ...] = ()  # clouds that said they send no more (privacy budget spent)
    secure: SecureRecord | None = None  # secure aggregation: contributions list headers only
    # What only the coordinator's key opens (a libsodium sealed box of a CoordinatorOnly):
    # the members who can read this record see no cloud's loss and no central-DP noise key.
    coordinator_only: bytes = b""
    running_sum: bool = False  # summed update by update as they came (RunningSum): replay sums it so
    record_version: int = RECORD_VERSION

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(to_wire(self), use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> VersionRecord:
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES)
        except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
            raise DecodeError(f"version record is not msgpack: {type(e).__name__}") from e
        if not isinstance(raw, dict):
            raise SchemaError("version record must be a map")
        if "progress" not in raw:  # version 1: progress at the top level
            raw = {**raw, "progress": {k: raw[k] for k in _PROGRESS_KEYS if k in raw}}
        try:
            return from_wire(cls, raw)
        except WireError as e:
            raise SchemaError(f"version record: {e}") from e

    @property
    def samples(self) -> int:
        return sum(c.samples for c in self.contributions)
