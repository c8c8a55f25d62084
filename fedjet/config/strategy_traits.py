"""What the rest of fedjet needs to know about each aggregation rule, as data (torch-free).

Config validation, secure aggregation, the downlink cadence, the workers and the chaos bench
ask these traits instead of comparing strategy names; the strategy classes in
``fedjet.coordinator.strategies`` take their class attributes from here, so a rule's traits are
written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class StrategyTraits:
    name: str
    synchronous: bool  # rounds wait for every cloud (or a quorum)
    update_kind: str  # "delta" or "gradient": what a worker sends
    delta_reference: str  # "base" or "last_send": what a worker's delta is measured from
    needs_stale_bases: bool  # formula 4 mixes against the update's own base
    one_update_per_version: bool  # async: a version is one update
    weights_from_losses: bool  # formula 2: weights are a function of the clouds' losses
    averages_clipped_updates: bool  # central DP can clip, weigh alike and noise its average
    secure_agg_refusal: str | None  # why a masked sum cannot make this rule's version, or None
    default_server_lr: float  # lr 1 reproduces formulas 1, 2 and 4; gradient steps need a step size


TRAITS: dict[str, StrategyTraits] = {
    t.name: t
    for t in (
        StrategyTraits(
            name="fedavg", synchronous=True, update_kind="delta", delta_reference="base", needs_stale_bases=False,
            one_update_per_version=False, weights_from_losses=False, averages_clipped_updates=True,
            secure_agg_refusal=None, default_server_lr=1.0,
        ),
        StrategyTraits(
            name="dynamic", synchronous=True, update_kind="delta", delta_reference="base", needs_stale_bases=False,
            one_update_per_version=False, weights_from_losses=True, averages_clipped_updates=False,
            secure_agg_refusal="its weights (formula 2) depend on every cloud's loss, fixed only after masking",
            default_server_lr=1.0,
        ),
        StrategyTraits(
            name="gradient", synchronous=True, update_kind="gradient", delta_reference="base",
            needs_stale_bases=False, one_update_per_version=False, weights_from_losses=False,
            averages_clipped_updates=False, secure_agg_refusal=None, default_server_lr=0.05,
        ),
        StrategyTraits(
            name="async", synchronous=False, update_kind="delta", delta_reference="base", needs_stale_bases=True,
            one_update_per_version=True, weights_from_losses=False, averages_clipped_updates=False,
            secure_agg_refusal="it folds one update at a time, so the sum of one would be that update",
            default_server_lr=1.0,
        ),
        StrategyTraits(
            name="fedbuff", synchronous=False, update_kind="delta", delta_reference="last_send",
            needs_stale_bases=False, one_update_per_version=False, weights_from_losses=False,
            averages_clipped_updates=True, secure_agg_refusal=None, default_server_lr=1.0,
        ),
    )
}  # fmt: skip
STRATEGIES = tuple(TRAITS)


def traits_of(name: str) -> StrategyTraits:
    try:
        return TRAITS[name]
    except KeyError:
        raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {name!r}") from None
