"""Byte-level tokenizer: fixed before training, needs no pooling of any cloud's text."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus one end-of-document token (256)."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str, *, eos: bool = True) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.append(ids, self.eos_id) if eos else ids

    def decode(self, ids: np.ndarray | list[int]) -> str:
        raw = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return raw.decode("utf-8", errors="replace")
