"""Resuming a killed coordinator from what JetStream already holds.

Every global version's (encrypted) record carries the coordinator's progress: how many updates
were applied, the stream sequence up to which everything is decided, where to resume reading
(the first chunk of anything still unapplied), and the anti-replay counters of applied
updates. A restarted coordinator reads the last head, rebuilds the weights from the stream,
and re-reads from ``resume_from``; blobs ending at or before ``applied_through`` were decided
already and are skipped, so no update is lost or applied twice. Unacked updates are simply
delivered again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nats.js.errors

from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.messages import GlobalHead
from fedjet.coordinator.aggregate import Weights
from fedjet.errors import ConfigError
from fedjet.follow import GlobalFollower


@dataclass
class Progress:
    """The part of the coordinator's state that lives in each version's record."""

    applied_total: int = 0
    applied_through: int = 0  # every update blob ending at or before this seq is decided
    resume_from: int = 1  # first stream seq still needed (unapplied or partial blobs)
    guard: dict[str, int] = field(default_factory=dict)  # last applied seq per cloud/worker
    rejected: dict[str, int] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        return {
            "applied_total": self.applied_total,
            "applied_through": self.applied_through,
            "resume_from": self.resume_from,
            "guard": dict(self.guard),
            "rejected": dict(self.rejected),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Progress:
        return cls(
            applied_total=int(meta.get("applied_total", 0)),
            applied_through=int(meta.get("applied_through", 0)),
            resume_from=int(meta.get("resume_from", 1)),
            guard={str(k): int(v) for k, v in meta.get("guard", {}).items()},
            rejected={str(k): int(v) for k, v in meta.get("rejected", {}).items()},
        )


@dataclass
class Checkpoint:
    head: GlobalHead
    head_seq: int
    weights: Weights
    meta: dict[str, Any]
    progress: Progress
    history: dict[int, Weights]  # recent versions, for stale asynchronous updates


async def last_checkpoint(js: Any, subjects: JobSubjects, follower: GlobalFollower, keep: int) -> Checkpoint | None:
    """The newest recorded version of this job, or None for a fresh job."""
    try:
        raw = await js.get_last_msg(subjects.global_stream, subjects.global_head)
    except nats.js.errors.NotFoundError:
        return None
    head = follower.parse_head(raw.data)
    if head.final:
        raise ConfigError(f"job {subjects.job!r} has finished (version {head.version} is final); start a new --job")
    version = await follower.fetch(head)
    meta = follower.meta(head)
    history = {head.version: version.tensors}
    cursor = head
    while len(history) < keep and cursor.prev_head_seq > 0:
        previous = follower.parse_head((await js.get_msg(subjects.global_stream, cursor.prev_head_seq)).data)
        history[previous.version] = (await follower.fetch(previous)).tensors
        cursor = previous
    return Checkpoint(head, raw.seq, version.tensors, meta, Progress.from_meta(meta), history)
