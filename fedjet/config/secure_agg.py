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

from fedjet.config.strategy_traits import TRAITS, traits_of
from fedjet.errors import ConfigError

RING_HALF = (1 << 63) - 1  # the signed range of the ring Z/2^64 that members mask in
STALENESS_UNIT = 1 << 16  # FedBuff: s(tau) in (0, 1] as a whole weight, one member = this many units


def encoded_limit(scale: float, bound: float) -> int:
    """``Q``: the largest magnitude one clipped coordinate encodes to."""
    return max(1, math.ceil(bound * scale))


USAGE = "on, or threshold=T,scale=S,bound=B,density=D,timeout=SECONDS (any of them)"
KEYS = ("threshold", "scale", "bound", "density", "timeout")


@dataclass(frozen=True, kw_only=True)
class SecureAggConfig:
    threshold: int | None = None  # None: a majority of the clouds
    scale: float = float(1 << 20)
    bound: float = 1.0
    density: float = 1.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"fixed-point scale must be finite and > 0, got {self.scale}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"fixed-point bound must be finite and > 0, got {self.bound}")
        if RING_HALF // encoded_limit(self.scale, self.bound) < STALENESS_UNIT:
            raise ConfigError(f"bound * scale = {self.bound * self.scale:g} leaves no room in a 64-bit ring")
        if self.threshold is not None and self.threshold < 2:
            raise ConfigError(f"--secure-agg threshold must be >= 2, got {self.threshold}")
        if not (math.isfinite(self.density) and 0.0 < self.density <= 1.0):
            raise ConfigError(f"--secure-agg density must be in (0, 1], got {self.density}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"--secure-agg timeout must be > 0 seconds, got {self.timeout_s}")

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
        most = RING_HALF // (STALENESS_UNIT * encoded_limit(self.scale, self.bound))
        if members > most:
            raise ConfigError(
                f"{members} members with bound {self.bound:g} and scale {self.scale:g} can overflow the 64-bit ring "
                f"(at most {most}): lower the bound or the scale"
            )
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
    rule = traits_of(strategy)
    if rule.secure_agg_refusal is not None:
        allowed = ", ".join(t.name for t in TRAITS.values() if t.secure_agg_refusal is None)
        raise ConfigError(f"--secure-agg with --strategy {strategy}: {rule.secure_agg_refusal}; use {allowed}")
    if central_dp:
        raise ConfigError("--secure-agg with --central-dp: the coordinator cannot clip updates it never sees")
    if deadline:
        raise ConfigError("--secure-agg rounds close by their own phase timeout: drop --quorum/--round-deadline")
    threshold = config.threshold_for(clouds)
    if not rule.synchronous and not threshold <= buffer_size <= clouds:  # a buffer of K masked updates
        raise ConfigError(
            f"--secure-agg with fedbuff masks one buffer per round, one update per cloud: --buffer-size must be "
            f"in {threshold}..{clouds} (the threshold .. the clouds), got {buffer_size}"
        )
