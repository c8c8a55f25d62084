"""Central DP (DP-FedAvg, McMahan et al. 2018): clip each update, average with equal weights,
add Gaussian noise to the average. Pure and seeded by (job seed, version), so replay re-derives
the very same noise and still verifies.

Each version is one Gaussian mechanism on the clouds' updates with sensitivity ``clip / n``;
``dp-accounting`` composes the versions (every cloud takes part in every round: no sampling
amplification). The protected unit is a whole cloud's update, so this means something only with
many clouds: with three, noise that hides one cloud drowns the signal. Record-level DP-SGD in the
workers (``--dp``) is what protects the records inside a cloud.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.validate import clipped
from fedjet.privacy.accounting import epsilon_for
from fedjet.privacy.config import CentralDPConfig

REPORT_DELTA = 1e-5


def equal_and_clipped(parts: Sequence[Contribution], clip: float) -> list[Contribution]:
    """Every update scaled to norm <= clip and weighted alike (sample counts would leak)."""
    out = []
    for part in parts:
        c = clipped(part, clip)
        out.append(Contribution(c.cloud, c.base_version, 1, c.loss, c.tensors))
    return out


def add_noise(pseudo_grad: Weights, config: CentralDPConfig, clouds: int, seed: int, version: int) -> Weights:
    """N(0, (noise * clip / clouds)^2) on every coordinate of the averaged update."""
    std = config.noise * config.clip / max(clouds, 1)
    generator = torch.Generator().manual_seed(_seed(seed, version))
    return {
        name: g + torch.randn(g.shape, generator=generator, dtype=g.dtype) * std
        for name, g in sorted(pseudo_grad.items())
    }


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


def _seed(seed: int, version: int) -> int:
    digest = hashlib.sha256(f"central-dp/{seed}/{version}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
