"""Partitioning: which articles each cloud holds, and how much work each does per round.

Pure functions over sizes, so they are unit-tested by hand and reused by the experiment
harness. Articles never move between clouds after the initial deal; "dynamic" partitioning
changes how many local steps (how large a share of each round's work) a cloud gets.
"""

from __future__ import annotations

import numpy as np

from fedjet.errors import ConfigError

SCHEMES = ("fixed", "noniid", "dynamic")


def deal_fixed(sizes: list[int], n_clouds: int) -> list[list[int]]:
    """Even IID shares: longest article first to the cloud holding the fewest tokens."""
    _check(sizes, n_clouds)
    shares: list[list[int]] = [[] for _ in range(n_clouds)]
    load = [0] * n_clouds
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(n_clouds), key=lambda c: (load[c], c))
        shares[target].append(index)
        load[target] += sizes[index]
    return [sorted(s) for s in shares]


def deal_noniid(sizes: list[int], n_clouds: int, alpha: float, seed: int) -> list[list[int]]:
    """Dirichlet(alpha) shares of contiguous article runs: clouds differ in topics and size.

    Small ``alpha`` gives very unequal shares; every cloud keeps at least one article.
    """
    _check(sizes, n_clouds)
    if alpha <= 0:
        raise ConfigError(f"--alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(n_clouds, alpha))
    order = rng.permutation(len(sizes)).tolist()
    total = float(sum(sizes))
    bounds = np.cumsum(proportions) * total
    shares: list[list[int]] = [[] for _ in range(n_clouds)]
    seen = 0.0
    for index in order:
        midpoint = seen + sizes[index] / 2
        cloud = int(np.searchsorted(bounds, midpoint, side="right"))
        shares[min(cloud, n_clouds - 1)].append(index)
        seen += sizes[index]
    _ensure_nonempty(shares)
    return [sorted(s) for s in shares]


def _ensure_nonempty(shares: list[list[int]]) -> None:
    for share in shares:
        if not share:
            share.append(max(shares, key=len).pop())


def split_steps(throughputs: dict[str, float], total_steps: int, min_steps: int = 1) -> dict[str, int]:
    """Share ``total_steps`` in proportion to measured throughput (largest remainder).

    Clouds that compute faster get more local steps so that all finish a round together.
    """
    if not throughputs:
        raise ConfigError("split_steps needs at least one cloud")
    names = sorted(throughputs)
    if total_steps < min_steps * len(names):
        raise ConfigError(f"{total_steps} steps cannot give {len(names)} clouds {min_steps} each")
    rates = np.array([float(throughputs[n]) for n in names])
    rates = np.where(np.isfinite(rates) & (rates > 0), rates, 1e-9)
    spare = total_steps - min_steps * len(names)
    exact = rates / rates.sum() * spare
    steps = np.floor(exact).astype(int)
    remainder = spare - int(steps.sum())
    for i in np.argsort(-(exact - steps), kind="stable")[:remainder]:
        steps[i] += 1
    return {n: int(s) + min_steps for n, s in zip(names, steps, strict=True)}


def _check(sizes: list[int], n_clouds: int) -> None:
    if n_clouds < 1:
        raise ConfigError("need at least one cloud")
    if len(sizes) < n_clouds:
        raise ConfigError(f"{len(sizes)} articles cannot be dealt to {n_clouds} clouds")
