"""The records DP protects and how a DP-SGD batch is drawn from them (pure numpy).

The accountant's guarantee holds for Poisson sampling over a *fixed* set of records: every record
joins a batch independently with probability q, so batch sizes vary and may be 0. The ordinary
:class:`~fedjet.data.batches.BatchSampler` draws overlapping random windows, which matches no
accountant, so a DP worker cuts its shard into disjoint windows (its records) instead.
"""

from __future__ import annotations

import numpy as np

from fedjet.errors import ConfigError, DataError
from fedjet.privacy.secure_random import SecureRandom


def record_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Disjoint windows of ``seq_len + 1`` tokens, shape ``(N, seq_len + 1)``: the protected records.

    Disjoint, so one token of text lies in exactly one record; a trailing partial window is dropped.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    width = seq_len + 1
    count = len(tokens) // width
    if count == 0:
        raise DataError(f"shard has {len(tokens)} tokens, fewer than one record of {width}")
    return np.asarray(tokens[: count * width], dtype=np.int64).reshape(count, width)


def sample_rate_for(expected_batch: float, n_records: int) -> float:
    """q such that a Poisson batch holds ``expected_batch`` records on average."""
    if n_records < 1:
        raise DataError("no records to sample from")
    if not 0 < expected_batch <= n_records:
        raise ConfigError(f"expected batch {expected_batch} must lie in (0, {n_records}] (the records in this shard)")
    return float(expected_batch) / n_records


def poisson_batch(randomness: SecureRandom, n_examples: int, sample_rate: float) -> np.ndarray:
    """Indices of the records in one Poisson-sampled batch (each kept with probability q),
    drawn from a CSPRNG stream: which records a step used must not follow from the spec."""
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    return np.flatnonzero(randomness.bernoulli(n_examples, sample_rate))
