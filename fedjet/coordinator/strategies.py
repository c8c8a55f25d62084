"""Strategies: which rule, its parameters, and the state that folds batches into versions.

:class:`Aggregator` owns the global weights, the version counter, the server optimizer and
(for formula 4) the recent versions a stale update may refer to. It is pure: the live
coordinator and ``fedjet replay`` drive the very same object with the same batches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedjet.codecs.tensors import weights_hash
from fedjet.coordinator import aggregate as agg
from fedjet.coordinator.aggregate import Contribution, Staleness, Weights
from fedjet.coordinator.server_opt import ServerOptConfig, ServerOptimizer
from fedjet.errors import ConfigError, StaleUpdateError

STRATEGIES = ("fedavg", "dynamic", "gradient", "async", "fedbuff")
SYNCHRONOUS = ("fedavg", "dynamic", "gradient")


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """``--strategy`` and its parameters; recorded in the report and in every global version."""

    name: str = "fedavg"
    temperature: float = 1.0  # dynamic
    alpha: float = 0.6  # async mixing weight
    staleness: Staleness = field(default_factory=Staleness)
    max_staleness: int = 8
    buffer_size: int = 3  # fedbuff K
    server: ServerOptConfig = field(default_factory=ServerOptConfig)

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {self.name!r}")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"--alpha-async must be in (0, 1], got {self.alpha}")
        if self.max_staleness < 0 or self.buffer_size < 1:
            raise ConfigError("--max-staleness must be >= 0 and --buffer-size >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")

    @property
    def synchronous(self) -> bool:
        return self.name in SYNCHRONOUS

    @property
    def update_kind(self) -> str:
        return "gradient" if self.name == "gradient" else "delta"

    @property
    def delta_reference(self) -> str:
        """What a worker's delta is measured from: its base global, or its last send (FedBuff
        sums deltas, so a worker that continues without a new global must not resend work)."""
        return "last_send" if self.name == "fedbuff" else "base"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StrategyConfig:
        fields = dict(raw)
        fields["staleness"] = Staleness(**fields.get("staleness", {}))
        fields["server"] = ServerOptConfig(**fields.get("server", {}))
        return cls(**fields)


@dataclass(frozen=True)
class Applied:
    """One contribution placed in a batch, with the staleness it was folded in with."""

    contribution: Contribution
    staleness: int


class Aggregator:
    """Global weights + version + server optimizer; ``apply(batch)`` makes the next version."""

    def __init__(
        self,
        config: StrategyConfig,
        weights: Weights,
        version: int = 0,
        *,
        bases: Callable[[int], Weights] | None = None,
        bases_from_record: bool = False,
    ) -> None:
        """``bases`` supplies base versions this aggregator never held (replay); with
        ``bases_from_record`` every base comes from it (counterfactuals number versions anew)."""
        self.config = config
        self.weights = weights
        self.version = version
        self.bases = bases
        self.bases_from_record = bases_from_record
        self.optimizer = ServerOptimizer(config.server)
        self._history: OrderedDict[int, Weights] = OrderedDict([(version, weights)])
        self.hash = weights_hash(weights)

    def staleness_of(self, base_version: int) -> int:
        if base_version > self.version:
            raise StaleUpdateError(f"base version {base_version} is newer than the global {self.version}")
        return self.version - base_version

    def admissible(self, base_version: int) -> int:
        """Staleness of an update from ``base_version``; raises if it must be dropped."""
        tau = self.staleness_of(base_version)
        if tau > self.config.max_staleness:
            raise StaleUpdateError(f"staleness {tau} > --max-staleness {self.config.max_staleness}")
        if self.config.name == "async" and base_version not in self._history and self.bases is None:
            raise StaleUpdateError(f"base version {base_version} is no longer held")
        return tau

    def apply(self, batch: Sequence[Applied]) -> Weights:
        """Fold one batch (a sync round, one async update, or K buffered updates)."""
        if not batch:
            raise StaleUpdateError("an empty batch makes no version")
        pseudo_grad = self._pseudo_gradient(batch)
        self.weights = self.optimizer.step(self.weights, pseudo_grad)
        self.version += 1
        self.hash = weights_hash(self.weights)
        self._remember()
        return self.weights

    def _pseudo_gradient(self, batch: Sequence[Applied]) -> Weights:
        cfg, parts = self.config, [a.contribution for a in batch]
        s = [cfg.staleness(a.staleness) for a in batch]
        if cfg.name == "async":
            (only,) = batch
            base = self.base_weights(only.contribution.base_version)
            return agg.async_mix(self.weights, base, only.contribution, cfg.alpha, s[0])
        if cfg.name == "fedbuff":
            return agg.fedbuff(self.weights, parts, s)
        if cfg.name == "gradient":
            return agg.gradient(self.weights, parts, s)
        if cfg.name == "dynamic":
            return agg.dynamic(self.weights, parts, cfg.temperature, s)
        return agg.fedavg(self.weights, parts, s)

    def base_weights(self, version: int) -> Weights:
        if version in self._history and not self.bases_from_record:
            return self._history[version]
        if self.bases is None:
            raise StaleUpdateError(f"base version {version} is no longer held")
        return self.bases(version)

    def preload(self, versions: dict[int, Weights]) -> None:
        """Recent versions a restarted coordinator read back (formula 4 needs stale bases)."""
        if self.config.name == "async":
            merged = {**versions, self.version: self.weights}
            self._history = OrderedDict((v, merged[v]) for v in sorted(merged))
            self._remember()

    def resync(self, weights: Weights, version: int) -> None:
        """Continue from known weights (replay after a mismatch; the optimizer state is kept)."""
        self.weights, self.version, self.hash = weights, version, weights_hash(weights)
        self._remember()

    def _remember(self) -> None:
        if self.config.name != "async":
            self._history = OrderedDict([(self.version, self.weights)])
            return
        self._history[self.version] = self.weights
        while len(self._history) > self.config.max_staleness + 1:
            self._history.popitem(last=False)
