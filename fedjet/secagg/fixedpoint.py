"""Fixed-point encoding of float updates into the ring Z_{2^64}, where masks cancel exactly.

Masks are uniform in Z_{2^64}; only integer arithmetic modulo 2^64 makes
``sum(y_u) - sum(masks) == sum(x_u)`` hold exactly. Each member clips its update to
``[-bound, bound]``, rounds ``value * scale`` to an integer ``q`` (``|q| <= Q = ceil(bound *
scale)``) and multiplies it by its own whole weight ``w`` (a number it computes itself: see
:mod:`fedjet.secagg.weights`), two's complement in 64 bits. Decoding reads the ring sum back as
a signed int64 and divides by ``scale`` times the survivors' units.

Overflow condition: the decoded sum is right only while ``|sum| < 2^63``. With ``n`` members each
contributing ``|w * q| <= max_weight(n) * Q``, where ``max_weight(n) = (2^63 - 1) // (n * Q)``,
the sum cannot wrap: weights are capped there (``check_members`` refuses rosters that leave
less than ``STALENESS_UNIT``). Each member loses at most ``0.5 / scale`` to rounding.

Range check: a sum of honest inputs lies within ``Q * sum(w)`` in every coordinate; ``decode``
refuses anything else (``OutOfRangeError``), since no set of clipped inputs could make it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedjet.config.secure_agg import RING_HALF, STALENESS_UNIT, SecureAggConfig, encoded_limit
from fedjet.errors import ConfigError
from fedjet.secagg.errors import EncodingError, OutOfRangeError

RING_BITS = 64
RING_BYTES = RING_BITS // 8
U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]
_HALF = RING_HALF


def as_numpy(x: Any) -> npt.NDArray[np.float64]:
    """A float64 copy of a numpy array or torch tensor (moved to the CPU first), flattened."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()  # .double() also covers bfloat16
    return np.asarray(x, dtype=np.float64).reshape(-1)


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """Job parameters of the encoding; every member and the coordinator must agree on them."""

    scale: float = float(1 << 20)  # resolution ~1e-6 per member
    bound: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"fixed-point scale must be finite and > 0, got {self.scale}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"fixed-point bound must be finite and > 0, got {self.bound}")
        if self.max_weight(1) < STALENESS_UNIT:
            raise ConfigError(f"bound * scale = {self.bound * self.scale:g} leaves no room in a 64-bit ring")

    @classmethod
    def for_job(cls, config: SecureAggConfig) -> FixedPoint:
        """The encoding a job's ``--secure-agg`` parameters define."""
        return cls(scale=config.scale, bound=config.bound)

    @property
    def limit(self) -> int:
        """``Q``: the largest magnitude one clipped coordinate encodes to."""
        return encoded_limit(self.scale, self.bound)

    def max_weight(self, members: int) -> int:
        """The largest whole weight with which ``members`` contributions cannot overflow the ring."""
        return _HALF // (max(members, 1) * self.limit)

    @property
    def max_members(self) -> int:
        """The most members whose weights can still reach ``STALENESS_UNIT``."""
        return _HALF // (STALENESS_UNIT * self.limit)

    def check_members(self, n: int) -> None:
        """Refuse a roster whose weights would have to be capped below ``STALENESS_UNIT``."""
        if n > self.max_members:
            raise ConfigError(
                f"{n} members with bound {self.bound:g} and scale {self.scale:g} can overflow the 64-bit ring "
                f"(at most {self.max_members}): lower the bound or the scale"
            )

    def encode(self, x: Any, *, weight: int = 1) -> U64:
        """Clip, round and multiply one member's update by its whole weight (flattened ring elements)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= self.max_weight(1):
            raise EncodingError(f"a fixed-point weight must be a whole number in [1, {self.max_weight(1)}]")
        values = as_numpy(x)
        if not np.isfinite(values).all():
            raise EncodingError("an update with NaN or Inf cannot be encoded")
        q = np.rint(np.clip(values, -self.bound, self.bound) * self.scale).astype(np.int64)
        return (q * np.int64(weight)).view(np.uint64)

    def decode(self, total: U64, *, weight_total: int = 1, unit_total: int = 1) -> F32:
        """``total / (scale * unit_total)`` of a ring sum, refused (``OutOfRangeError``) unless every
        coordinate lies within what inputs of ``weight_total`` clipped weights can add up to."""
        if total.dtype != np.uint64:
            raise EncodingError(f"a ring sum must be uint64, got {total.dtype}")
        if weight_total < 1 or unit_total < 1:
            raise EncodingError(f"weight and unit totals must be >= 1, got {weight_total}, {unit_total}")
        signed = total.view(np.int64)
        reach = min(self.limit * weight_total, _HALF)
        outside = np.flatnonzero((signed > reach) | (signed < -reach))
        if outside.size:
            raise OutOfRangeError(
                f"{outside.size} coordinate(s) of the unmasked sum lie beyond +-{reach} (what clipped inputs "
                "of these weights can add up to): some member sent an out-of-range input"
            )
        return (signed.astype(np.float64) / (self.scale * unit_total)).astype(np.float32)


def fedavg_weights(samples: Mapping[str, int]) -> dict[str, float]:
    """Formula 1/3 weights ``n_i / n`` over the roster (for reports: masking uses whole weights)."""
    if not samples or any(n < 0 for n in samples.values()):
        raise ConfigError("fedavg weights need at least one member and non-negative sample counts")
    total = sum(samples.values())
    if total <= 0:
        raise ConfigError("fedavg weights need a positive total sample count")
    return {member: n / total for member, n in samples.items()}
