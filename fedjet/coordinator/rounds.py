"""When to aggregate: synchronous rounds (all clouds, or a quorum by a deadline), single
asynchronous updates, or FedBuff buffers of K. Pure: the clock is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fedjet.config.job import RoundConfig
from fedjet.errors import StaleUpdateError

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    cloud: str
    staleness: int
    item: T


@dataclass
class Batcher(Generic[T]):
    """Collects admitted updates until a batch is ready.

    ``synchronous``: one round of ``clouds`` per version; otherwise a buffer of ``size`` (1 for
    async, K for FedBuff). ``offer`` raises :class:`StaleUpdateError` for updates the policy
    drops. The live coordinator and counterfactual replay both batch through this one class.
    """

    synchronous: bool
    clouds: tuple[str, ...]
    policy: RoundConfig = field(default_factory=RoundConfig)
    size: int = 1
    round_started: float = 0.0
    retired: set[str] = field(default_factory=set)  # clouds that will send no more (a round no longer waits)
    _entries: list[_Entry[T]] = field(default_factory=list)

    def start_round(self, now: float) -> None:
        self.round_started = now

    def offer(self, cloud: str, staleness: int, item: T) -> T | None:
        """Admit ``item``; returns an item it displaced (a carried stale update of the same
        cloud, replaced by that cloud's fresh one), which the caller drops and counts."""
        if not self.synchronous:
            self._entries.append(_Entry(cloud, staleness, item))
            return None
        if staleness > 0 and self.policy.late == "drop":
            raise StaleUpdateError(f"late update (staleness {staleness}) dropped by --late drop")
        for i, entry in enumerate(self._entries):
            if entry.cloud != cloud:
                continue
            if entry.staleness > 0 and staleness == 0:
                self._entries[i] = _Entry(cloud, staleness, item)
                return entry.item
            raise StaleUpdateError(f"{cloud} already reported in this round")
        self._entries.append(_Entry(cloud, staleness, item))
        return None

    def ready(self, now: float) -> bool:
        if not self.synchronous:
            return len(self._entries) >= self.size
        reported = {e.cloud for e in self._entries}
        active = set(self.clouds) - self.retired
        if reported >= active and (reported or active):
            return True
        deadline = self.policy.deadline_s
        quorum = self.policy.quorum or len(self.clouds)
        return deadline is not None and now - self.round_started >= deadline and len(reported) >= quorum

    def take(self) -> list[tuple[int, T]]:
        """The batch, in arrival (stream) order, as (staleness, item) pairs."""
        count = len(self._entries) if self.synchronous else self.size
        batch, self._entries = self._entries[:count], self._entries[count:]
        return [(e.staleness, e.item) for e in batch]

    @property
    def pending(self) -> int:
        return len(self._entries)

    def retire(self, cloud: str) -> None:
        self.retired.add(cloud)

    @property
    def everyone_retired(self) -> bool:
        return self.retired >= set(self.clouds)

    def pending_items(self) -> list[T]:
        return [e.item for e in self._entries]
