"""Low-rank compression of weight matrices (PowerSGD, Vogels et al. 2019), without shared state.

A tensor seen as a matrix ``M`` (its first dimension by the rest) is sent as two factors,
``P`` (m x r) and ``Q`` (n x r) with ``M ~ P Q^T``: ``r (m + n)`` values instead of ``m n``.
Unlike top-k, every coordinate moves every round, which is what a short horizon needs.

The factors come from subspace iteration started at a seeded random ``Q``
(``P = orth(M Q); Q = M^T P``, twice): the best rank-r approximation within the subspace it
finds. PowerSGD warm-starts from the previous round's ``Q`` instead; we start afresh so the
receiver needs nothing but the message, and let error feedback carry what one round missed.

Only the sender does linear algebra. The receiver rebuilds ``P Q^T`` as ``r`` rank-1 products
added in a fixed order (elementwise float32, no BLAS), so the coordinator and every worker get
the same bits: a lossy downlink's view hash depends on it.
"""

from __future__ import annotations

import math

import numpy as np

ITERATIONS = 2


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(first dimension, the rest): how a tensor is factorised."""
    if len(shape) < 2:
        return (shape[0] if shape else 1), 1
    return shape[0], math.prod(shape[1:])


def effective_rank(shape: tuple[int, ...], rank: int) -> int:
    """The rank a tensor is sent at, or 0 when factors would not be at least twice as small."""
    m, n = matrix_shape(shape)
    r = min(rank, m, n)
    return r if len(shape) >= 2 and 2 * r * (m + n) <= m * n else 0


def factorize(matrix: np.ndarray, rank: int, seed: int) -> np.ndarray:
    """Factors of a float32 (m, n) matrix, flattened as ``[P^T, Q^T]`` (each column contiguous,
    so a quantization chunk keeps to one singular direction)."""
    m, n = matrix.shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, rank)).astype(np.float32)
    p = np.zeros((m, rank), dtype=np.float32)
    for _ in range(ITERATIONS):
        p, _ = np.linalg.qr(matrix @ q)
        q = matrix.T @ p
    return np.concatenate([p.T.reshape(-1), q.T.reshape(-1)]).astype(np.float32)


def rebuild(factors: np.ndarray, shape: tuple[int, ...], rank: int) -> np.ndarray:
    """``P Q^T`` from flattened factors, summed rank by rank in order (bit-reproducible)."""
    m, n = matrix_shape(shape)
    p, q = factors[: m * rank].reshape(rank, m), factors[m * rank :].reshape(rank, n)
    out = np.zeros((m, n), dtype=np.float32)
    for k in range(rank):
        out += np.multiply.outer(p[k], q[k])
    return out.reshape(-1)
