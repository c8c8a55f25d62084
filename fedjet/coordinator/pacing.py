"""Dynamic partitioning: each cloud's measured speed and the local steps it is assigned.

Pure (the clock is passed in). Speeds come from the workers' claims, bounded by what the
coordinator can check: tokens at most what was assigned, compute time at least a fraction of
what the coordinator itself saw pass since that cloud last had work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedjet.coordinator.validate import plausible_rate
from fedjet.data.partition import split_steps
from fedjet.log import get_logger
from fedjet.spec import JobSpec

log = get_logger("fedjet.coordinator")


@dataclass
class Pacer:
    spec: JobSpec
    assignment: dict[str, int] = field(default_factory=dict)  # cloud -> local steps asked of it next
    throughput: dict[str, float] = field(default_factory=dict)  # cloud -> smoothed tokens/s
    published_at: dict[int, float] = field(default_factory=dict)  # version -> clock at publication
    last_arrival: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.assignment = {**dict.fromkeys(self.spec.clouds, self.spec.config.train.local_steps), **self.assignment}

    def observe(self, cloud: str, base_version: int, tokens: int, compute_s: float, now: float) -> float | None:
        """Fold one update's claimed speed in; returns the rate believed (None: nothing to say)."""
        train = self.spec.config.train
        assigned = self.assignment.get(cloud, train.local_steps) * train.batch_size * train.seq_len
        since = max(self.published_at.get(base_version, 0.0), self.last_arrival.get(cloud, 0.0))
        self.last_arrival[cloud] = now
        rate = plausible_rate(min(tokens, assigned), compute_s, now - since if since else 0.0)
        if rate is not None:
            old = self.throughput.get(cloud)
            self.throughput[cloud] = rate if old is None else 0.5 * old + 0.5 * rate
        return rate

    def published(self, version: int, now: float) -> None:
        self.published_at[version] = now
        self.published_at.pop(version - self.spec.strategy.max_staleness - 2, None)

    def after_version(self, version: int) -> None:
        """Re-assign steps by measured speed every ``rebalance_every`` versions (dynamic only)."""
        partition = self.spec.config.partition
        if partition.scheme != "dynamic" or version % partition.rebalance_every:
            return
        if len(self.throughput) < len(self.spec.clouds):
            return
        self.assignment = split_steps(self.throughput, self.spec.config.train.local_steps * len(self.spec.clouds))
        log.info("rebalanced", assignment=self.assignment)
