"""Top-k selection by magnitude without a full sort.

As in Deep Gradient Compression, a threshold is estimated from a random sample of
magnitudes; the candidates above a slightly lowered threshold are then trimmed to exactly
``k`` with ``argpartition``. The cost is a few linear passes over the tensor plus work on
about ``k`` candidates, instead of an ``O(n log n)`` sort.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_MIN = 8_192  # magnitudes sampled to estimate the threshold (at least)
SAMPLE_FRACTION = 1 / 256  # ... or this share of the tensor, whichever is larger
EXACT_BELOW = 65_536  # small tensors: exact argpartition is cheaper than sampling
SLACK = 0.8  # sample quantile is lowered so the candidate set very likely holds >= k


def kept_count(numel: int, density: float) -> int:
    """At least one value per non-empty tensor, at most all of them."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(density * numel)))


def sample_size(n: int) -> int:
    return min(n, max(SAMPLE_MIN, int(n * SAMPLE_FRACTION)))


def topk_indices(values: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest ``|values|`` (ties broken arbitrarily)."""
    n = values.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if n <= EXACT_BELOW:
        return np.sort(np.argpartition(np.abs(values), n - k)[n - k :]).astype(np.int64)
    rng = np.random.default_rng(seed)
    sample = np.abs(values[rng.integers(0, n, size=sample_size(n))])
    fraction = k / n
    while True:
        candidates = above(values, sampled_threshold(sample, fraction))
        if candidates.size >= k:
            return trim(candidates, np.abs(values[candidates]), k)
        fraction *= 2  # unlucky sample: lower the bar and try again


def sampled_threshold(sample: np.ndarray, fraction: float) -> float:
    """A magnitude that about ``fraction / SLACK`` of the sampled values reach."""
    target = min(1.0, fraction / SLACK)
    if target >= 1.0:
        return -1.0
    kth = min(sample.size - 1, int(sample.size * (1.0 - target)))
    return float(np.partition(sample, kth)[kth])


def above(values: np.ndarray, threshold: float) -> np.ndarray:
    """Sorted indices with ``|value| >= threshold``, without materialising ``|values|``."""
    if threshold <= 0:
        return np.arange(values.size, dtype=np.int64)
    mask = values >= threshold
    mask |= values <= -threshold
    return np.flatnonzero(mask)


def trim(candidates: np.ndarray, magnitudes: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest of sorted ``candidates``, still sorted (a mask, not a sort)."""
    if candidates.size == k:
        return candidates.astype(np.int64)
    keep = np.zeros(candidates.size, dtype=bool)
    keep[np.argpartition(magnitudes, candidates.size - k)[candidates.size - k :]] = True
    return candidates[keep].astype(np.int64)
