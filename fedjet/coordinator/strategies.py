"""Strategies as classes, and the :class:`Aggregator` that folds batches into versions.

A strategy declares what the rest of the system needs to know about it (is it synchronous,
how many updates make a version, how many past versions it must hold, what kind of update it
takes, what a worker's delta is measured from) and turns a batch into a pseudo-gradient with
the pure functions of :mod:`fedjet.coordinator.aggregate`. Nothing else looks at its name.

:class:`Aggregator` owns the global weights, the version counter, the server optimizer and the
recent versions a stale update may refer to. The live coordinator and ``fedjet replay`` drive
the very same object with the same batches.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedjet.codecs.sparse import add_scaled_
from fedjet.codecs.tensors import weights_hash
from fedjet.config.job import StrategyConfig
from fedjet.config.strategy_traits import STRATEGIES, StrategyTraits, traits_of
from fedjet.coordinator import aggregate as agg
from fedjet.coordinator.aggregate import Contribution, RunningSum, Weights
from fedjet.coordinator.central_dp import add_noise, central_pseudo_gradient
from fedjet.coordinator.server_opt import ServerOptimizer
from fedjet.coordinator.validate import clip_bound, clipped
from fedjet.errors import AggregationError, NonFiniteError, StaleUpdateError
from fedjet.privacy.secure_random import KEY_BYTES

__all__ = ["STRATEGIES", "Aggregator", "Applied", "Strategy", "StrategyConfig", "strategy_for"]
BaseOf = Callable[[int], Weights]


@dataclass(frozen=True)
class Applied:
    """One contribution placed in a batch, with the staleness it was folded in with."""

    contribution: Contribution
    staleness: int

    def folded(self) -> Applied:
        """What a round still holds of an update its running sum took in: no tensors."""
        return Applied(replace(self.contribution, tensors={}), self.staleness)


class Strategy:
    """Base: a synchronous FedAvg-like rule over deltas measured from the base version."""

    name: ClassVar[str]
    # Taken from the rule's traits (fedjet.config.strategy_traits), written once there.
    traits: ClassVar[StrategyTraits]
    synchronous: ClassVar[bool]
    update_kind: ClassVar[str]
    delta_reference: ClassVar[str]  # FedBuff's "last_send": a worker that goes on must not resend work
    needs_stale_bases: ClassVar[bool]  # formula 4 mixes against the update's own base
    folds_as_it_goes: ClassVar[bool] = False  # a RunningSum can take its updates one by one

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.traits = traits = traits_of(cls.name)
        cls.synchronous, cls.update_kind = traits.synchronous, traits.update_kind
        cls.delta_reference, cls.needs_stale_bases = traits.delta_reference, traits.needs_stale_bases

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    def batch_size(self, clouds: int) -> int:
        """Updates per version: a whole round of clouds, or a buffer."""
        return clouds

    @property
    def history_depth(self) -> int:
        """Versions to hold so stale updates find their base."""
        return self.config.max_staleness + 1 if self.needs_stale_bases else 1

    def pseudo_gradient(self, weights: Weights, batch: Sequence[Applied], base_of: BaseOf) -> Weights:
        raise NotImplementedError

    def discounts(self, batch: Sequence[Applied]) -> list[float]:
        return [self.config.staleness(a.staleness) for a in batch]


class FedAvg(Strategy):
    name = "fedavg"
    folds_as_it_goes = True  # a running sum can take its updates one at a time

    def pseudo_gradient(self, weights: Weights, batch: Sequence[Applied], base_of: BaseOf) -> Weights:
        return agg.fedavg(weights, [a.contribution for a in batch], self.discounts(batch))


class Dynamic(Strategy):
    name = "dynamic"

    def pseudo_gradient(self, weights: Weights, batch: Sequence[Applied], base_of: BaseOf) -> Weights:
        parts = [a.contribution for a in batch]
        return agg.dynamic(weights, parts, self.config.temperature, self.discounts(batch))


class Gradient(Strategy):
    name = "gradient"

    def pseudo_gradient(self, weights: Weights, batch: Sequence[Applied], base_of: BaseOf) -> Weights:
        return agg.gradient(weights, [a.contribution for a in batch], self.discounts(batch))


class Async(Strategy):
    name = "async"

    def batch_size(self, clouds: int) -> int:
        return 1

    def pseudo_gradient(self, weights: Weights, batch: Sequence[Applied], base_of: BaseOf) -> Weights:
        (only,) = batch
        base = base_of(only.contribution.base_version)
        return agg.async_mix(weights, base, only.contribution, self.config.alpha, self.discounts(batch)[0])


class FedBuff(Strategy):
    name = "fedbuff"

    def batch_size(self, clouds: int) -> int:
        return self.config.buffer_size

    def pseudo_gradient(self, weights: Weights, batch: Sequence[Applied], base_of: BaseOf) -> Weights:
        return agg.fedbuff(weights, [a.contribution for a in batch], self.discounts(batch))


_CLASSES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, Dynamic, Gradient, Async, FedBuff)}
assert tuple(_CLASSES) == STRATEGIES


def strategy_for(config: StrategyConfig) -> Strategy:
    return _CLASSES[config.name](config)


class Aggregator:
    """Global weights + version + server optimizer; ``apply(batch)`` makes the next version."""

    def __init__(
        self,
        config: StrategyConfig,
        weights: Weights,
        version: int = 0,
        *,
        bases_from_record: bool = False,
        clouds: int = 1,
    ) -> None:
        """Replay supplies base versions this aggregator never held with :meth:`provide_base`;
        with ``bases_from_record`` every base comes from there (counterfactuals number
        versions anew). ``clouds`` fixes central DP's denominator (the strategy's batch size
        for that many clouds)."""
        self.config = config
        self.strategy = strategy_for(config)
        self.weights = weights
        self.version = version
        self.recorded_bases: dict[int, Weights] = {}
        self.bases_from_record = bases_from_record
        self.expected = self.strategy.batch_size(clouds)  # central DP divides by this, never by the count
        self.last_noise_key = b""  # central DP: the key of the newest version's noise (recorded, sealed)
        self.optimizer = ServerOptimizer(config.server)
        self._history: OrderedDict[int, Weights] = OrderedDict([(version, weights)])
        self.hash = weights_hash(weights)
        self._running: RunningSum | None = None  # the open round's sum, where rounds fold as they go
        self._bound: tuple[int, float | None] = (-1, None)  # (version, clip bound) for folds

    def staleness_of(self, base_version: int) -> int:
        if base_version > self.version:
            raise StaleUpdateError(f"base version {base_version} is newer than the global {self.version}")
        return self.version - base_version

    def admissible(self, base_version: int) -> int:
        """Staleness of an update from ``base_version``; raises if it must be dropped."""
        tau = self.staleness_of(base_version)
        if tau > self.config.max_staleness:
            raise StaleUpdateError(f"staleness {tau} > --max-staleness {self.config.max_staleness}")
        if self.strategy.needs_stale_bases and not self.holds(base_version):
            raise StaleUpdateError(f"base version {base_version} is no longer held")
        return tau

    def holds(self, version: int) -> bool:
        """Whether the base ``version`` is at hand (replay fetches the ones that are not)."""
        if version in self.recorded_bases:
            return True
        return version in self._history and not self.bases_from_record

    def provide_base(self, version: int, weights: Weights) -> None:
        self.recorded_bases[version] = weights

    def apply(self, batch: Sequence[Applied], *, noise_key: bytes | None = None, running: bool = False) -> Weights:
        """Fold one batch (a sync round, one async update, or K buffered updates), each update
        clipped to ``clip_update`` x the global's norm. A batch that would make the weights
        non-finite raises :class:`NonFiniteError` and changes nothing. Under central DP the
        noise stream's key is ``noise_key`` (replay passes the recorded one) or a fresh one
        from the OS CSPRNG, kept in :attr:`last_noise_key` for the record. ``running``: the
        batch is summed as :meth:`fold` sums a round (what its record says made the version)."""
        if not batch:
            raise StaleUpdateError("an empty batch makes no version")
        if running:
            for applied in batch:
                self.fold(applied)
            return self.close_round()
        bound = clip_bound(self.weights, self.config.clip_update)
        batch = [Applied(clipped(a.contribution, bound), a.staleness) for a in batch]
        central = self.config.central_dp_config
        key = b""
        if central is None:
            pseudo_grad = self.strategy.pseudo_gradient(self.weights, batch, self.base_weights)
        else:
            parts, discounts = [a.contribution for a in batch], self.strategy.discounts(batch)
            pseudo_grad = central_pseudo_gradient(self.weights, parts, discounts, central.clip, self.expected)
            key = os.urandom(KEY_BYTES) if noise_key is None else noise_key
            pseudo_grad = add_noise(pseudo_grad, central, self.expected, key)
        return self._step(pseudo_grad, key)

    def can_fold(self) -> bool:
        """Whether rounds may be summed as updates come (:meth:`fold`): a rule whose weights
        need no other update of the round, and no central DP (it clips the sum's parts)."""
        return self.strategy.folds_as_it_goes and self.config.central_dp_config is None

    def check_fold(self, applied: Applied) -> None:
        """Raise :class:`NonFiniteError` for an update that alone would make the weights
        non-finite (what :meth:`apply_finite` refuses), before a round takes it in."""
        part, discount = self._for_fold(applied)
        if part.samples <= 0:
            raise AggregationError(f"{part.cloud}'s update claims no samples: a running sum weighs by samples")
        lr = self.config.server.step_size
        for name, tensor in part.tensors.items():  # one tensor's worth of scratch at a time
            moved = torch.zeros_like(self.weights[name])
            add_scaled_(moved, tensor, lr * discount)
            if not bool(torch.isfinite(moved.add_(self.weights[name])).all()):
                raise NonFiniteError(f"{part.cloud}'s update would make the global non-finite")

    def fold(self, applied: Applied) -> None:
        """Take one update of the open round into its running sum, clipped as :meth:`apply`
        clips it; the caller may then let its tensors go."""
        part, discount = self._for_fold(applied)
        if self._running is None:
            self._running = RunningSum(self.weights)
        self._running.add(part, discount)

    def _for_fold(self, applied: Applied) -> tuple[Contribution, float]:
        if not self.can_fold():
            raise AggregationError(f"{self.strategy.name} rounds are not summed update by update")
        if self._bound[0] != self.version:  # the global's norm: once a version, not once an update
            self._bound = (self.version, clip_bound(self.weights, self.config.clip_update))
        return clipped(applied.contribution, self._bound[1]), self.strategy.discounts([applied])[0]

    def close_round(self) -> Weights:
        """The version the open round's running sum makes (:class:`NonFiniteError`: none, and
        the round is over either way)."""
        running, self._running = self._running, None
        if running is None or not running.count:
            raise StaleUpdateError("an empty batch makes no version")
        return self._step(running.fedavg(), b"")

    def _step(self, pseudo_grad: Weights, noise_key: bytes) -> Weights:
        saved = self.optimizer.saved(pseudo_grad)
        weights = self.optimizer.step(self.weights, pseudo_grad, consume=True)
        if not all(bool(torch.isfinite(t).all()) for t in weights.values()):
            self.optimizer.restore(saved)
            raise NonFiniteError(f"version {self.version + 1} would not be finite")
        self.weights = weights
        self.version += 1
        self.hash = weights_hash(self.weights)
        self.last_noise_key = noise_key
        self._remember()
        return self.weights

    def apply_finite(self, batch: Sequence[Applied], *, noise_key: bytes | None = None) -> list[int]:
        """Fold ``batch`` without the updates that would make the global non-finite; returns
        their positions (all of them when none does so alone: then no version is made)."""
        try:
            self.apply(batch, noise_key=noise_key)
            return []
        except NonFiniteError:
            pass
        bad = [i for i, a in enumerate(batch) if not self._finite_alone(a)] or list(range(len(batch)))
        rest = [a for i, a in enumerate(batch) if i not in bad]
        if rest:
            try:
                self.apply(rest, noise_key=noise_key)
            except NonFiniteError:
                return list(range(len(batch)))
        return bad

    def _finite_alone(self, applied: Applied) -> bool:
        bound = clip_bound(self.weights, self.config.clip_update)
        one = [Applied(clipped(applied.contribution, bound), applied.staleness)]
        grad = self.strategy.pseudo_gradient(self.weights, one, self.base_weights)
        lr = self.config.server.step_size
        return all(bool(torch.isfinite(self.weights[n] - lr * g).all()) for n, g in grad.items())

    def base_weights(self, version: int) -> Weights:
        if version in self._history and not self.bases_from_record:
            return self._history[version]
        if version not in self.recorded_bases:
            raise StaleUpdateError(f"base version {version} is no longer held")
        return self.recorded_bases[version]

    def preload(self, versions: dict[int, Weights]) -> None:
        """Recent versions a restarted coordinator read back (stale updates need their bases)."""
        merged = {**versions, self.version: self.weights}
        self._history = OrderedDict((v, merged[v]) for v in sorted(merged))
        self._remember()

    def resync(self, weights: Weights, version: int) -> None:
        """Continue from known weights (replay after a mismatch; the optimizer state is kept)."""
        self.weights, self.version, self.hash = weights, version, weights_hash(weights)
        self._running, self._bound = None, (-1, None)
        self._remember()

    def _remember(self) -> None:
        self._history[self.version] = self.weights
        while len(self._history) > self.strategy.history_depth:
            self._history.popitem(last=False)
