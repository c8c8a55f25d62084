"""Symmetric quantization with one float32 scale per chunk of values.

int8 keeps levels -127..127, int4 keeps -7..7 (two per byte). Rounding to the nearest level
means every decoded value lies within half a quantization step (``scale / 2``) of its input.
"""

from __future__ import annotations

import math

import numpy as np

from fedjet.config.codec import DEFAULT_CHUNK
from fedjet.errors import DecodeError

LEVELS = {"int8": 127, "int4": 7}


def quantize(values: np.ndarray, bits: str, chunk: int = DEFAULT_CHUNK) -> tuple[bytes, bytes]:
    """(packed levels, float32 scales) for a flat float32 array."""
    levels = LEVELS[bits]
    n = values.size
    chunks = math.ceil(n / chunk) if n else 0
    padded = np.zeros(chunks * chunk, dtype=np.float32)
    padded[:n] = values
    blocks = padded.reshape(chunks, chunk)
    scales = (np.abs(blocks).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.rint(blocks / safe[:, None]).clip(-levels, levels).astype(np.int8).reshape(-1)[:n]
    return _pack(q, bits), scales.tobytes()


def dequantize(packed: bytes, scales_raw: bytes, n: int, bits: str, chunk: int) -> np.ndarray:
    """Inverse of :func:`quantize`; sizes are checked before anything is expanded."""
    chunks = math.ceil(n / chunk) if n else 0
    if len(scales_raw) != 4 * chunks:
        raise DecodeError(f"{len(scales_raw)} scale bytes for {chunks} chunks")
    expected = n if bits == "int8" else (n + 1) // 2
    if len(packed) != expected:
        raise DecodeError(f"{len(packed)} {bits} bytes for {n} values")
    scales = np.frombuffer(scales_raw, dtype="<f4")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise DecodeError("quantization scales must be finite and non-negative")
    q = _unpack(packed, n, bits)
    if (np.abs(q) > LEVELS[bits]).any():
        raise DecodeError(f"{bits} level out of range")
    values: np.ndarray = q.astype(np.float32) * np.repeat(scales, chunk)[:n]
    return values


def _pack(q: np.ndarray, bits: str) -> bytes:
    if bits == "int8":
        return q.tobytes()
    nibbles = (q.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack(packed: bytes, n: int, bits: str) -> np.ndarray:
    raw = np.frombuffer(packed, dtype=np.uint8 if bits == "int4" else np.int8)
    if bits == "int8":
        return raw
    low, high = raw & 0x0F, raw >> 4
    nibbles = np.empty(raw.size * 2, dtype=np.int8)
    nibbles[0::2], nibbles[1::2] = low, high
    nibbles = nibbles[:n]
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
