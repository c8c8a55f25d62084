"""A member's weight, computed by the member itself from facts it checked: never the coordinator's.

A coordinator that hands out weights can send 1, 0, 0 and turn the "sum" into one member's
update. Instead each member derives a whole weight ``w`` and a number of ``units`` it counts
for from its own update header and the job's rule, signs both in its advertisement, and masks
``w * q`` (its clipped, rounded update times ``w``). The unmasked sum divided by ``scale`` times
the survivors' units is the job's weighted average:

* formulas 1 and 3 (``fedavg``, ``gradient``): ``w = units = min(samples, max_weight)``, so the
  result is ``sum(n_i x_i) / sum(n_i)`` over the survivors;
* FedBuff: ``w = round(s(tau) * 2^16)`` (at least 1), ``units = 2^16``, where ``tau`` is the
  round's base version minus the version the member trained on, so the result is FedBuff's
  ``mean(s(tau_i) x_i)``.

``max_weight`` is the ring's overflow cap for the roster (``FixedPoint.max_weight``); the
coordinator checks each advertised weight against the same rule and the member's header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedjet.config.secure_agg import STALENESS_UNIT
from fedjet.secagg.errors import SecAggProtocolError


@dataclass(frozen=True)
class Weight:
    """What one member's masked input counts for: ``weight * q`` in the numerator, ``units``
    in the denominator."""

    weight: int
    units: int


@dataclass(frozen=True, kw_only=True)
class WeightRule:
    """The job's rule, the same on every member and the coordinator."""

    max_weight: int
    staleness: Callable[[int], float] | None = None  # None: by sample count (formulas 1 and 3)
    max_staleness: int = 0

    def of(self, *, samples: int, tau: int) -> Weight:
        """This member's weight: from its own sample count, or the staleness of its base."""
        if self.staleness is None:
            if tau != 0:
                raise SecAggProtocolError(f"a synchronous round takes updates of its own base only (staleness {tau})")
            w = min(max(samples, 1), self.max_weight)
            return Weight(w, w)
        if not 0 <= tau <= self.max_staleness:
            raise SecAggProtocolError(f"staleness {tau} is outside 0..{self.max_staleness}")
        s = float(self.staleness(tau))
        if not 0.0 < s <= 1.0:
            raise SecAggProtocolError(f"s({tau}) = {s} is not in (0, 1]")
        return Weight(min(STALENESS_UNIT, max(1, round(s * STALENESS_UNIT))), STALENESS_UNIT)
