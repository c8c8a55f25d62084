"""Anti-replay: the admission state that makes a re-sent update useless."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedjet.errors import ReplayError, ValidationError

MAX_WORKERS_PER_CLOUD = 16  # keeps the anti-replay counters, and so every version record, small


@dataclass
class ReplayGuard:
    """Per (cloud, worker) sequence numbers must strictly increase; at most
    ``max_workers`` worker ids per cloud (each costs room in every version record)."""

    last: dict[str, int] = field(default_factory=dict)
    max_workers: int = MAX_WORKERS_PER_CLOUD

    def check(self, cloud: str, worker: str, seq: int) -> None:
        key = f"{cloud}/{worker}"
        previous = self.last.get(key)
        if previous is not None and seq <= previous:
            raise ReplayError(f"{key} sequence {seq} <= last accepted {previous}")
        if previous is None and sum(k.startswith(f"{cloud}/") for k in self.last) >= self.max_workers:
            raise ValidationError(f"{cloud} already has {self.max_workers} workers; {worker!r:.40} is one too many")
        self.last[key] = seq
