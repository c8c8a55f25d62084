"""Resuming a killed coordinator from what JetStream already holds.

Every version's record carries the coordinator's progress: how many updates were applied, the
stream sequence up to which everything is decided, where to resume reading (the first chunk of
anything still unapplied), and the anti-replay counters. A restarted coordinator reads the
newest head, rebuilds the weights, and re-reads from ``resume_from``; blobs ending at or before
``applied_through`` were decided already and are skipped, so no update is lost or applied twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.channel.globals import GlobalFollower, LatestHead
from fedjet.codecs.record import VersionRecord
from fedjet.coordinator.aggregate import Weights
from fedjet.errors import JobFinished


@dataclass
class Checkpoint:
    latest: LatestHead
    weights: Weights
    record: VersionRecord
    history: dict[int, Weights]  # recent versions, for stale asynchronous updates


async def last_checkpoint(follower: GlobalFollower, keep: int) -> Checkpoint | None:
    """The newest recorded version of this job and the ``keep`` versions up to it, or None."""
    latest = await follower.read_latest()
    if latest is None:
        return None
    head = latest.head
    if head.final:
        raise JobFinished(f"job {head.job!r} has finished (version {head.version} is final); nothing to do")
    version = await follower.fetch(head)
    history = {head.version: version.tensors}
    cursor = await follower.previous(head)
    while len(history) < keep and cursor is not None:
        history[cursor.version] = (await follower.fetch(cursor)).tensors
        cursor = await follower.previous(cursor)
    return Checkpoint(latest, version.tensors, follower.record(head), history)
