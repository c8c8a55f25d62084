"""Replay: re-apply recorded updates with the coordinator's own pieces. Pure.

The async runner (:mod:`fedjet.runner.replay`) reads the record and the updates and hands
them in; this module only re-aggregates. :class:`Verifier` re-applies each version's recorded
batch under the recorded strategy and compares hashes. :func:`counterfactual_batches` groups
the same updates as another strategy would, through the service's own :class:`Batcher`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedjet.codecs.record import ContributionRecord, SecureRecord
from fedjet.config.job import StrategyConfig
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.rounds import Batcher
from fedjet.coordinator.strategies import Aggregator, Applied, strategy_for
from fedjet.errors import ConfigError, FedjetError, StaleUpdateError


@dataclass(frozen=True)
class RecordedVersion:
    """A global version as the coordinator recorded it: its hash and what went into it."""

    version: int
    hash: str
    contributions: tuple[ContributionRecord, ...]
    secure: SecureRecord | None = None  # made from one unmasked sum, recomputed from its transcript
    noise_key: bytes = b""  # central DP: the recorded key of this version's noise (coordinator's eyes only)
    running_sum: bool = False  # the round was summed update by update (RunningSum's rounding)


@dataclass(frozen=True)
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


class Verifier:
    """Re-applies recorded versions one at a time. After a mismatch the runner resyncs it to
    the recorded weights, so each tampered version is reported (with a stateful server
    optimizer later versions may differ too: its state cannot be rebuilt from the record)."""

    def __init__(self, strategy: StrategyConfig, start: Weights, start_version: int, clouds: int = 1) -> None:
        self.aggregator = Aggregator(strategy, start, start_version, clouds=clouds)
        self.result = VerifyResult()

    def check(self, record: RecordedVersion, contributions: Sequence[Contribution]) -> Mismatch | None:
        got, reason = self._reapply(record, contributions)
        self.result.versions += 1
        if reason is None:
            return None
        mismatch = Mismatch(record.version, record.hash, got, reason)
        self.result.mismatches.append(mismatch)
        return mismatch

    def fail(self, record: RecordedVersion, reason: str) -> Mismatch:
        """A version that could not even be re-applied (its update is missing or invalid)."""
        self.result.versions += 1
        mismatch = Mismatch(record.version, record.hash, None, reason)
        self.result.mismatches.append(mismatch)
        return mismatch

    def _reapply(self, record: RecordedVersion, contributions: Sequence[Contribution]) -> tuple[str | None, str | None]:
        agg = self.aggregator
        if record.version != agg.version + 1:
            return None, f"versions are not consecutive: replay is at {agg.version}"
        try:
            batch = []
            if record.secure is not None:  # the survivors' sum, as the coordinator applied it
                agg.apply([Applied(c, 0) for c in contributions], noise_key=record.noise_key or None)
                return agg.hash, None if agg.hash == record.hash else "weights hash differs"
            for recorded, contribution in zip(record.contributions, contributions, strict=True):
                staleness = agg.staleness_of(contribution.base_version)
                if staleness != recorded.staleness:
                    return None, f"recorded staleness {recorded.staleness} but the update implies {staleness}"
                batch.append(Applied(contribution, staleness))
            agg.apply(batch, noise_key=record.noise_key or None, running=record.running_sum)
        except FedjetError as e:
            return None, f"{e.reason}: {e}"
        return agg.hash, None if agg.hash == record.hash else "weights hash differs"


def counterfactual_batches(
    versions: Sequence[RecordedVersion], strategy: StrategyConfig, recorded: StrategyConfig, clouds: tuple[str, ...]
) -> Iterator[list[ContributionRecord]]:
    """The same recorded updates, in stream order, grouped as ``strategy`` would fold them."""
    rule, recorded_rule = strategy_for(strategy), strategy_for(recorded)
    if rule.update_kind != recorded_rule.update_kind:
        raise ConfigError(
            f"the recorded updates are {recorded_rule.update_kind}s; {rule.name} needs {rule.update_kind}s"
        )
    if rule.synchronous and recorded_rule.synchronous:  # the recorded rounds are the rounds
        yield from (list(v.contributions) for v in versions if v.contributions)
        return
    batcher: Batcher[ContributionRecord] = Batcher(
        synchronous=rule.synchronous, clouds=clouds, size=rule.batch_size(len(clouds))
    )
    deferred: list[ContributionRecord] = []  # a cloud's second update waits for the next round
    for contribution in (c for v in versions for c in v.contributions):
        queue, deferred = [*deferred, contribution], []
        for item in queue:
            try:
                batcher.offer(item.cloud, 0, item)
            except StaleUpdateError:
                deferred.append(item)
            if batcher.ready(0.0):
                yield [c for _, c in batcher.take()]
    rest = [c for _, c in batcher.take()] + deferred
    if rest:
        yield rest


class Counterfactual:
    """Folds counterfactual batches. Updates were trained from the recorded bases, so formula
    4 mixes against the recorded base weights and staleness is the recorded one."""

    def __init__(self, strategy: StrategyConfig, start: Weights, start_version: int, clouds: int = 1) -> None:
        self.aggregator = Aggregator(strategy, start, start_version, bases_from_record=True, clouds=clouds)

    def apply(self, batch: Sequence[ContributionRecord], contributions: Sequence[Contribution]) -> Weights:
        applied = [Applied(c, r.staleness) for r, c in zip(batch, contributions, strict=True)]
        return self.aggregator.apply(applied)
