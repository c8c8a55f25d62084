"""Replay: re-apply recorded updates with the coordinator's own aggregation code.

Pure: the recorded versions, a way to turn a recorded contribution into a
:class:`Contribution`, and a way to fetch recorded weights come in; hashes and weights go out.
``verify`` re-applies each version's recorded batch under the recorded strategy and compares
hashes; ``counterfactual`` re-batches the same updates for another strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.strategies import Aggregator, Applied, StrategyConfig
from fedjet.errors import ConfigError, FedjetError

ContributionOf = Callable[[dict[str, Any]], Contribution]


@dataclass(frozen=True)
class RecordedVersion:
    """A global version as the coordinator recorded it: its hash and what went into it."""

    version: int
    hash: str
    contributions: list[dict[str, Any]]  # cloud, stream_seq, base, staleness, samples, loss, wire_bytes


@dataclass
class Mismatch:
    version: int
    expected: str
    got: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "expected": self.expected, "got": self.got, "reason": self.reason}


@dataclass
class VerifyResult:
    versions: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        first = self.mismatches[0].to_dict() if self.mismatches else None
        return {"versions": self.versions, "mismatches": len(self.mismatches), "first_mismatch": first}


def verify(
    start: Weights,
    start_version: int,
    versions: list[RecordedVersion],
    strategy: StrategyConfig,
    contribution_of: ContributionOf,
    recorded_weights: Callable[[int], Weights],
    on_version: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Re-apply every recorded batch in order; after a mismatch continue from the recorded
    weights, so each tampered version is reported (with a stateful server optimizer later
    versions may differ too, since its state cannot be rebuilt from the record)."""
    aggregator = Aggregator(strategy, start, start_version, bases=recorded_weights)
    result = VerifyResult()
    for record in versions:
        got, reason = _reapply(aggregator, record, contribution_of)
        result.versions += 1
        if reason is not None:
            result.mismatches.append(Mismatch(record.version, record.hash, got, reason))
            aggregator.resync(recorded_weights(record.version), record.version)
        if on_version is not None:
            on_version(record.version)
    return result


def _reapply(
    aggregator: Aggregator, record: RecordedVersion, contribution_of: ContributionOf
) -> tuple[str | None, str | None]:
    if record.version != aggregator.version + 1:
        return None, f"versions are not consecutive: replay is at {aggregator.version}"
    try:
        batch = []
        for recorded in record.contributions:
            contribution = contribution_of(recorded)
            staleness = aggregator.staleness_of(contribution.base_version)
            if staleness != int(recorded["staleness"]):
                return None, f"recorded staleness {recorded['staleness']} but the update implies {staleness}"
            batch.append(Applied(contribution, staleness))
        aggregator.apply(batch)
    except FedjetError as e:
        return None, f"{e.reason}: {e}"
    return aggregator.hash, None if aggregator.hash == record.hash else "weights hash differs"


def counterfactual_batches(
    versions: list[RecordedVersion], strategy: StrategyConfig, recorded_strategy: StrategyConfig, clouds: int
) -> Iterator[list[dict[str, Any]]]:
    """The same recorded updates, in stream order, grouped as ``strategy`` would fold them."""
    if strategy.update_kind != recorded_strategy.update_kind:
        raise ConfigError(
            f"the recorded updates are {recorded_strategy.update_kind}s; {strategy.name} needs {strategy.update_kind}s"
        )
    if strategy.synchronous and recorded_strategy.synchronous:
        yield from (v.contributions for v in versions if v.contributions)
        return
    flat = [c for v in versions for c in v.contributions]
    size = clouds if strategy.synchronous else 1 if strategy.name == "async" else strategy.buffer_size
    for i in range(0, len(flat), size):
        yield flat[i : i + size]


def counterfactual(
    start: Weights,
    start_version: int,
    versions: list[RecordedVersion],
    strategy: StrategyConfig,
    recorded_strategy: StrategyConfig,
    clouds: int,
    contribution_of: ContributionOf,
    recorded_weights: Callable[[int], Weights],
) -> Iterator[tuple[int, Weights, str, list[dict[str, Any]]]]:
    """Yield (version, weights, hash, batch) for each counterfactual version.

    Updates were trained from the recorded bases, so formula 4 mixes against the recorded base
    weights and staleness is the recorded one.
    """
    aggregator = Aggregator(strategy, start, start_version, bases=recorded_weights, bases_from_record=True)
    for batch in counterfactual_batches(versions, strategy, recorded_strategy, clouds):
        applied = [Applied(contribution_of(c), int(c["staleness"])) for c in batch]
        weights = aggregator.apply(applied)
        yield aggregator.version, weights, aggregator.hash, batch
