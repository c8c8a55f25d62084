"""What a round driver needs of the coordinator, and no more.

The coordinator's update loop and :class:`~fedjet.coordinator.secure_service.SecureRounds` both
fold into the one aggregator and hand what they folded to the one commit path (ledger, metrics,
pacing, publish, ack); a round driver sees the coordinator only through this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedjet.codecs.record import SecureRecord
from fedjet.coordinator.record import Committed
from fedjet.coordinator.strategies import Aggregator


class Committer(Protocol):
    @property
    def aggregator(self) -> Aggregator | None:
        """The global weights and version (set once the job's first version is out)."""
        ...

    async def commit(self, committed: Sequence[Committed], *, secure: SecureRecord | None = None) -> None:
        """The aggregator made a new version from ``committed``: record, meter, pace, publish
        it (with ``secure``, the record of the round that made it), then ack what made it."""
        ...

    def reject(self, reason: str, cloud: str, detail: str) -> None:
        """Count and log something refused that is not an update on the stream (a round's step)."""
        ...

    def stopping(self) -> bool:
        """Stop taking work: asked to, or the job's stop condition is reached."""
        ...
