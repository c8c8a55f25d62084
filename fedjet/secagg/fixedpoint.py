"""Fixed-point encoding of float updates into the ring Z_{2^32}, where masks cancel exactly.

Masks are uniform in Z_{2^32}; only integer arithmetic modulo 2^32 makes
``sum(x_u + m_u) - sum(m_u) == sum(x_u)`` hold exactly, so each member clips its update to
``[-bound, bound]``, multiplies it by its agreed weight, and rounds ``value * scale`` to an
integer (two's complement in 32 bits). Decoding reads the ring sum back as a signed int32.

Overflow condition: the decoded sum is right only while ``|sum| < 2^31``; with weights in
``[0, 1]`` and rounding each member adds at most ``bound * scale + 1/2``, so
``n * (bound * scale + 1/2) < 2^31`` (roughly ``n * bound * scale < 2^31``) must hold.
``FixedPoint.check_members`` enforces it. Each member loses at most ``0.5 / scale`` to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedjet.errors import ConfigError
from fedjet.secagg.errors import EncodingError

RING_BITS = 32
U32 = npt.NDArray[np.uint32]
F32 = npt.NDArray[np.float32]


def as_numpy(x: Any) -> npt.NDArray[np.float64]:
    """A float64 copy of a numpy array or torch tensor (moved to the CPU first), flattened."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()  # .double() also covers bfloat16
    return np.asarray(x, dtype=np.float64).reshape(-1)


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """Job parameters of the encoding; every member and the coordinator must agree on them."""

    scale: float = float(1 << 20)  # resolution ~1e-6 per member
    bound: float = 1.0  # with the default scale: at most 2047 members

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"fixed-point scale must be finite and > 0, got {self.scale}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"fixed-point bound must be finite and > 0, got {self.bound}")
        if self.max_members < 1:
            raise ConfigError(f"bound * scale = {self.bound * self.scale:g} leaves no room in a 32-bit ring")

    @property
    def max_members(self) -> int:
        """The largest n with ``n * (bound * scale + 1/2) < 2^31``."""
        return int((2**31 - 1) // (self.bound * self.scale + 0.5))

    def check_members(self, n: int) -> None:
        """Refuse a roster whose worst-case sum would wrap around the ring."""
        if n > self.max_members:
            raise ConfigError(
                f"{n} members with bound {self.bound:g} and scale {self.scale:g} can overflow the 32-bit ring "
                f"(at most {self.max_members}): lower the bound or the scale"
            )

    def encode(self, x: Any, *, weight: float = 1.0) -> U32:
        """Clip, weight and round one member's update to ring elements (flattened)."""
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise EncodingError(f"a fixed-point weight must be in [0, 1], got {weight}")
        values = as_numpy(x)
        if not np.isfinite(values).all():
            raise EncodingError("an update with NaN or Inf cannot be encoded")
        scaled = np.rint(np.clip(values, -self.bound, self.bound) * (weight * self.scale))
        return scaled.astype(np.int32).view(np.uint32)

    def decode(self, total: U32, *, weight_total: float = 1.0) -> F32:
        """The float sum (divided by ``weight_total``: the survivors' weights) of a ring sum."""
        if total.dtype != np.uint32:
            raise EncodingError(f"a ring sum must be uint32, got {total.dtype}")
        if not (math.isfinite(weight_total) and weight_total > 0):
            raise EncodingError(f"weight_total must be finite and > 0, got {weight_total}")
        signed = total.view(np.int32).astype(np.float64)
        return (signed / (self.scale * weight_total)).astype(np.float32)


def fedavg_weights(samples: Mapping[str, int]) -> dict[str, float]:
    """Formula 1/3 weights ``n_i / n`` over the roster, fixed before anyone masks.

    They must be agreed before masking because the coordinator never sees a single update. If
    members drop, decode with ``weight_total`` = the survivors' weights to renormalize.
    """
    if not samples or any(n < 0 for n in samples.values()):
        raise ConfigError("fedavg weights need at least one member and non-negative sample counts")
    total = sum(samples.values())
    if total <= 0:
        raise ConfigError("fedavg weights need a positive total sample count")
    return {member: n / total for member, n in samples.items()}
