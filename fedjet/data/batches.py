"""Token streams for training and fixed windows for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fedjet.data.wikitext import Article
from fedjet.errors import DataError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, *, eos: bool = True) -> np.ndarray: ...


def encode_articles(articles: Sequence[Article], tokenizer: Tokenizer) -> np.ndarray:
    """One contiguous token stream, articles separated by the end-of-document token."""
    if not articles:
        raise DataError("no articles to encode")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    return np.concatenate([tokenizer.encode(a.text).astype(dtype) for a in articles])


class BatchSampler:
    """Random contiguous windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) < seq_len + 2:
            raise DataError(f"shard has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)

    def next_batch(self) -> np.ndarray:
        starts = self._rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows spread evenly over the whole split (deterministic)."""
    width = seq_len + 1
    available = len(tokens) // width
    if available == 0:
        raise DataError(f"evaluation split has {len(tokens)} tokens, fewer than one window")
    count = max(1, min(available, max_tokens // seq_len))
    picks = np.linspace(0, available - 1, num=count).round().astype(int)
    return np.stack([tokens[p * width : (p + 1) * width] for p in picks]).astype(np.int64)
