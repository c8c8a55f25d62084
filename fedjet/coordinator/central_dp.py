"""Central DP (DP-FedAvg, McMahan et al. 2018): clip each update, sum with equal weights,
divide by a fixed expected count, add Gaussian noise. Pure.

Neighbouring relation: two runs differ by adding or removing one cloud's whole update (its
update present or absent in a version). Each update is clipped to ``clip`` and discounted by
``s(τ) <= 1``, so adding or removing one moves the *sum* by at most ``clip``; dividing by the
fixed ``expected`` (the clouds of a round, or FedBuff's buffer size), never by how many updates
happened to arrive, keeps the sensitivity of the average ``clip / expected`` whatever the
count, and the noise ``N(0, (z·clip/expected)²)`` makes each version a Gaussian mechanism of
multiplier z that ``dp-accounting`` composes over versions (every cloud may take part in every
version: no sampling amplification). Replacing one cloud's update by another is two steps of
this relation (2·clip).

The noise comes from an AES-CTR stream whose 32-byte key is drawn from the OS CSPRNG for every
version and recorded sealed to the coordinator alone (:mod:`fedjet.codecs.withheld`): no cloud
or observer can regenerate it, and ``fedjet replay --verify`` with the coordinator's key still
reproduces the version bit for bit.

The protected unit is a whole cloud's update, so this means something only with many clouds:
with three, noise that hides one cloud drowns the signal. Record-level DP-SGD in the workers
(``--dp``) is what protects the records inside a cloud.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedjet.config.privacy import CentralDPConfig
from fedjet.coordinator.aggregate import Contribution, Weights, combine
from fedjet.coordinator.validate import clipped
from fedjet.privacy.accounting import epsilon_for
from fedjet.privacy.secure_random import SecureRandom

REPORT_DELTA = 1e-5


def central_pseudo_gradient(
    template: Weights, parts: Sequence[Contribution], discounts: Sequence[float], clip: float, expected: int
) -> Weights:
    """``-Σ s(τ_i)·clip(Δ_i) / expected``: every update clipped to norm ``clip``, weighted
    alike (sample counts would leak), the sum divided by the fixed expected count."""
    if expected < 1:
        raise ValueError(f"central DP needs an expected count >= 1, got {expected}")
    if len(parts) > expected:
        raise ValueError(f"{len(parts)} updates in a version of central DP, more than the {expected} expected")
    bounded = [clipped(p, clip) for p in parts]
    pseudo = combine(template, bounded, [s / expected for s in discounts])
    return {name: -t for name, t in pseudo.items()}


def add_noise(pseudo_grad: Weights, config: CentralDPConfig, expected: int, key: bytes) -> Weights:
    """N(0, (noise · clip / expected)²) on every coordinate, from the stream of ``key``."""
    std = config.noise * config.clip / expected
    randomness = SecureRandom(key)
    return {name: g + randomness.randn_like(g) * std for name, g in sorted(pseudo_grad.items())}


def central_epsilon(config: CentralDPConfig, versions: int, delta: float = REPORT_DELTA) -> float:
    return epsilon_for(config.noise, 1.0, versions, delta) if versions else 0.0


def central_report(config: CentralDPConfig, versions: int, delta: float = REPORT_DELTA) -> dict[str, float]:
    """The report's ``privacy.central``: each cloud's whole contribution protected at this ε."""
    return {
        "clip": config.clip,
        "noise_multiplier": config.noise,
        "versions": versions,
        "delta": delta,
        "epsilon": central_epsilon(config, versions, delta),
    }
