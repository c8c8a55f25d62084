"""``--secure-agg``: the job parameters every member and the coordinator agree on.

``on`` takes the defaults; ``threshold=T,scale=S,bound=B,density=D,timeout=SECONDS`` sets
them. The threshold defaults to a majority (``n // 2 + 1``: the protocol needs more than half,
see :mod:`fedjet.secagg.protocol`); ``scale`` and ``bound`` are the fixed-point encoding's
(:class:`FixedPoint`); ``density`` is the share of coordinates masked each round, the same
random ones for every member (drawn from the round's signed global head); ``timeout`` bounds
each protocol phase, after which the members that have not answered count as dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedjet.errors import ConfigError
from fedjet.secagg.fixedpoint import FixedPoint

USAGE = "on, or threshold=T,scale=S,bound=B,density=D,timeout=SECONDS (any of them)"
KEYS = ("threshold", "scale", "bound", "density", "timeout")
STRATEGIES = ("fedavg", "gradient", "fedbuff")  # weights fixed before masking


@dataclass(frozen=True, kw_only=True)
class SecureAggConfig:
    threshold: int | None = None  # None: a majority of the clouds
    scale: float = float(1 << 20)
    bound: float = 1.0
    density: float = 1.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.fixed_point  # noqa: B018 - validates scale and bound
        if self.threshold is not None and self.threshold < 2:
            raise ConfigError(f"--secure-agg threshold must be >= 2, got {self.threshold}")
        if not (math.isfinite(self.density) and 0.0 < self.density <= 1.0):
            raise ConfigError(f"--secure-agg density must be in (0, 1], got {self.density}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"--secure-agg timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(scale=self.scale, bound=self.bound)

    def threshold_for(self, members: int) -> int:
        """T of n: more than half (so no member's two secrets can both be gathered), at most n."""
        threshold = members // 2 + 1 if self.threshold is None else self.threshold
        if members < 2:
            raise ConfigError("--secure-agg needs at least two clouds: the sum of one is its update")
        if not members / 2 < threshold <= members:
            raise ConfigError(
                f"--secure-agg threshold {threshold} for {members} clouds: it must be more than half "
                f"and at most all of them ({members // 2 + 1}..{members})"
            )
        self.fixed_point.check_members(members)
        return threshold

    def numel_masked(self, numel: int) -> int:
        """Coordinates each member masks (at least one)."""
        return max(1, min(numel, round(numel * self.density)))

    def to_wire(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "scale": self.scale,
            "bound": self.bound,
            "density": self.density,
            "timeout_s": self.timeout_s,
        }


def parse_secure_agg(text: str) -> SecureAggConfig:
    """``on`` or ``key=value`` pairs (see :data:`USAGE`)."""
    text = text.strip()
    if text.lower() in ("on", "true", "yes", "1"):
        return SecureAggConfig()
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value or key in fields:
            raise ConfigError(f"--secure-agg {text!r:.80}: expected {USAGE}")
        fields[key] = value
    unknown = sorted(set(fields) - set(KEYS))
    if unknown:
        raise ConfigError(f"--secure-agg: unknown key(s) {unknown}; expected {USAGE}")
    try:
        numbers = {k: float(v) for k, v in fields.items()}
    except ValueError:
        raise ConfigError(f"--secure-agg {text!r:.80}: every value must be a number") from None
    threshold = numbers.get("threshold")
    if threshold is not None and not threshold.is_integer():
        raise ConfigError(f"--secure-agg threshold must be a whole number, got {fields['threshold']}")
    defaults = SecureAggConfig()
    return SecureAggConfig(
        threshold=None if threshold is None else int(threshold),
        scale=numbers.get("scale", defaults.scale),
        bound=numbers.get("bound", defaults.bound),
        density=numbers.get("density", defaults.density),
        timeout_s=numbers.get("timeout", defaults.timeout_s),
    )


def check_job(
    config: SecureAggConfig, *, strategy: str, clouds: int, central_dp: bool, deadline: bool, buffer_size: int
) -> None:
    """Refuse what secure aggregation cannot do, before any process starts."""
    if strategy not in STRATEGIES:
        why = {
            "dynamic": "its weights (formula 2) depend on every cloud's loss, fixed only after masking",
            "async": "it folds one update at a time, so the sum of one would be that update",
        }.get(strategy, "it is not a round of several updates")
        raise ConfigError(f"--secure-agg with --strategy {strategy}: {why}; use fedavg, gradient or fedbuff")
    if central_dp:
        raise ConfigError("--secure-agg with --central-dp: the coordinator cannot clip updates it never sees")
    if deadline:
        raise ConfigError("--secure-agg rounds close by their own phase timeout: drop --quorum/--round-deadline")
    threshold = config.threshold_for(clouds)
    if strategy == "fedbuff" and not threshold <= buffer_size <= clouds:
        raise ConfigError(
            f"--secure-agg with fedbuff masks one buffer per round, one update per cloud: --buffer-size must be "
            f"in {threshold}..{clouds} (the threshold .. the clouds), got {buffer_size}"
        )
