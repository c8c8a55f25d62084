"""Privacy accounting with Google's ``dp_accounting``: no hand-written privacy math lives here.

Each local DP-SGD step is a Poisson-subsampled Gaussian mechanism (sample rate q, noise multiplier
σ); a cloud's total loss is that event self-composed over every step of every update it sent.
Anyone holding (q, σ, steps, δ) and the accountant's name can recompute ε with the library.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fedjet.config.privacy import ACCOUNTANTS
from fedjet.errors import ConfigError

_SIGMA_FLOOR = 1e-3  # below this the RDP orders blow up; no useful calibration lands here
_SIGMA_CEILING = 1e4  # a target this strict is a configuration mistake, not a search problem


def _library() -> Any:
    """``dp_accounting``, imported on first use: it pulls in scipy, which every process of a job
    without DP would otherwise pay for at start."""
    import dp_accounting  # type: ignore[import-untyped]

    return dp_accounting


def dp_event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """The event one cloud's training amounts to: ``steps`` Poisson-subsampled Gaussians."""
    dp_accounting = _library()
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def make_accountant(accountant: str) -> Any:
    """A fresh accountant with the library's defaults (so a reader's fresh one agrees with ours)."""
    if accountant == "rdp":
        from dp_accounting import rdp

        return rdp.RdpAccountant()
    if accountant == "pld":
        from dp_accounting import pld

        return pld.PLDAccountant()
    raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε after ``steps`` DP-SGD steps at (q, σ) for the given δ; 0 for no steps, inf for no noise."""
    _check_inputs(sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    return _epsilon_cached(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    # The ledger asks the same question every round and PLD takes about a second: remember answers.
    fresh = make_accountant(accountant)
    fresh.compose(dp_event(noise_multiplier, sample_rate, steps))
    return float(fresh.get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The smallest σ (within 1e-4 relative) whose ε after ``steps`` steps is at most the target.

    ``dp_accounting.calibrate_dp_mechanism`` runs Brent's method and guarantees the side of the
    root that keeps ε <= target; we only supply a finite bracket, because at σ -> 0 some orders
    return inf and Brent's interpolation needs finite values.
    """
    _check_inputs(sample_rate, steps, delta)
    if steps < 1:
        raise ConfigError("calibrating noise needs at least one planned step")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    low, high = _bracket(target_epsilon, sample_rate, steps, delta, accountant)
    if low == high:
        return high
    dp_accounting = _library()
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        lambda s: dp_event(s, sample_rate, steps),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
        tol=high * 1e-4,
    )
    sigma = float(sigma)
    assert epsilon_for(sigma, sample_rate, steps, delta, accountant) <= target_epsilon, "calibration overshot"
    return sigma


def _bracket(target: float, sample_rate: float, steps: int, delta: float, accountant: str) -> tuple[float, float]:
    """σ values whose ε lie on either side of the target (both finite); equal when the floor is enough."""
    high = 1.0
    while epsilon_for(high, sample_rate, steps, delta, accountant) > target:
        high *= 2.0
        if high > _SIGMA_CEILING:
            raise ConfigError(
                f"no noise multiplier up to {_SIGMA_CEILING:g} reaches epsilon {target} for {steps} steps"
            )
    low = high / 2.0
    while epsilon_for(low, sample_rate, steps, delta, accountant) <= target:
        if low <= _SIGMA_FLOOR:
            return low, low
        high, low = low, low / 2.0
    while not math.isfinite(epsilon_for(low, sample_rate, steps, delta, accountant)):
        low = (low + high) / 2.0  # Brent's interpolation needs a finite gap at both ends
    return low, high


def _check_inputs(sample_rate: float, steps: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie strictly between 0 and 1, got {delta}")


@dataclass(frozen=True, kw_only=True)
class PrivacyLedger:
    """What one cloud has spent so far; a new ledger per update (frozen, so history is explicit)."""

    sample_rate: float
    noise_multiplier: float
    delta: float
    steps_spent: int = 0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _check_inputs(self.sample_rate, self.steps_spent, self.delta)
        if not self.noise_multiplier > 0:
            raise ConfigError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    def epsilon_spent(self) -> float:
        return self.epsilon_after(0)

    def epsilon_after(self, extra_steps: int) -> float:
        """ε if ``extra_steps`` more steps were taken (nothing is spent by asking)."""
        if extra_steps < 0:
            raise ValueError(f"extra_steps must be >= 0, got {extra_steps}")
        steps = self.steps_spent + extra_steps
        return epsilon_for(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)

    def can_afford(self, extra_steps: int, budget: float) -> bool:
        """The hard limit: False means the next update must be neither trained nor sent."""
        return self.epsilon_after(extra_steps) <= budget

    def spend(self, steps: int) -> PrivacyLedger:
        """The ledger after ``steps`` more steps were taken (and their update sent)."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return dataclasses.replace(self, steps_spent=self.steps_spent + steps)


def privacy_report(ledgers: Mapping[str, PrivacyLedger], *, clip: float) -> dict[str, Any]:
    """The report's ``privacy`` section, enough to recompute every cloud's ε with dp_accounting.

    ``noise_multiplier`` and ``sample_rate`` are single numbers when all clouds share them (the
    usual case); clouds with different shard sizes have different q, and then both become
    ``{cloud: value}`` maps so nothing is averaged away.
    """
    if not ledgers:
        raise ConfigError("a privacy report needs at least one cloud's ledger")
    first = next(iter(ledgers.values()))
    for cloud, ledger in ledgers.items():
        if (ledger.accountant, ledger.delta) != (first.accountant, first.delta):
            raise ConfigError(f"cloud {cloud!r} was accounted with a different accountant or delta")
    return {
        "accountant": first.accountant,
        "delta": first.delta,
        "noise_multiplier": _shared_or_per_cloud({c: lg.noise_multiplier for c, lg in ledgers.items()}),
        "sample_rate": _shared_or_per_cloud({c: lg.sample_rate for c, lg in ledgers.items()}),
        "clip": clip,
        "steps": {c: lg.steps_spent for c, lg in ledgers.items()},
        "epsilon": {c: lg.epsilon_spent() for c, lg in ledgers.items()},
    }


def _shared_or_per_cloud(values: dict[str, float]) -> float | dict[str, float]:
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


class Claim(Protocol):
    """What a worker's update header says it spent (``fedjet.codecs.messages.DPClaim``)."""

    delta: float
    noise: float
    sample_rate: float
    clip: float
    steps: int
    accountant: str


def claims_report(claims: Mapping[str, Claim]) -> dict[str, Any]:
    """The report's ``privacy`` section from each cloud's newest claim."""
    ledgers = {
        cloud: PrivacyLedger(
            sample_rate=c.sample_rate,
            noise_multiplier=c.noise,
            delta=c.delta,
            steps_spent=c.steps,
            accountant=c.accountant,
        )
        for cloud, c in sorted(claims.items())
    }
    return privacy_report(ledgers, clip=next(iter(claims.values())).clip)
