"""Top-k selection by magnitude without a full sort.

As in Deep Gradient Compression, a threshold is estimated from a random sample of
magnitudes; the candidates above a slightly lowered threshold are then trimmed to exactly
``k`` with ``argpartition``. The cost is a few linear passes over the tensor plus work on
about ``k`` candidates, instead of an ``O(n log n)`` sort.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE = 65_536  # magnitudes sampled to estimate the threshold
EXACT_BELOW = 65_536  # small tensors: exact argpartition is cheaper than sampling
SLACK = 0.8  # sample quantile is lowered so the candidate set very likely holds >= k


def kept_count(numel: int, density: float) -> int:
    """At least one value per non-empty tensor, at most all of them."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(density * numel)))


def topk_indices(values: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest ``|values|`` (ties broken arbitrarily)."""
    n = values.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    magnitude = np.abs(values)
    if n <= EXACT_BELOW:
        return np.sort(np.argpartition(magnitude, n - k)[n - k :]).astype(np.int64)
    candidates = _candidates(magnitude, k, seed)
    if candidates.size > k:
        keep = np.argpartition(magnitude[candidates], candidates.size - k)[candidates.size - k :]
        candidates = np.sort(candidates[keep])
    return candidates.astype(np.int64)


def _candidates(magnitude: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices whose magnitude beats a sampled threshold; widened until there are >= k."""
    n = magnitude.size
    rng = np.random.default_rng(seed)
    sample = magnitude[rng.integers(0, n, size=SAMPLE)]
    fraction = k / n
    while True:
        target = min(1.0, fraction / SLACK)
        threshold = np.quantile(sample, 1.0 - target) if target < 1.0 else -1.0
        candidates = np.flatnonzero(magnitude >= threshold)
        if candidates.size >= k:
            return candidates
        fraction *= 2  # unlucky sample: lower the bar and try again
