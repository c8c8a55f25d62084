"""Quantization with one float32 scale per chunk of values.

int8 keeps levels -127..127 and int4 -7..7 (two per byte), with the chunk's largest magnitude
as the top level: every decoded value lies within half a step (``scale / 2``) of its input.
Below four bits a max-scaled grid rounds most values to zero, so the two smallest levels
pick the scale that minimises the squared error instead (error feedback keeps the rest):

* int2 (ternary): values above ``0.7 * mean|x|`` become ``±s`` with ``s`` their mean
  magnitude, the others 0 (ternary weight networks' rule); five levels share a byte in base 3
  (3^5 = 243), 1.6 bits each instead of 2;
* int1 (sign, eight per byte): ``sign(x) * mean|x|``, which keeps each chunk's L1 mass.
"""

from __future__ import annotations

import math

import numpy as np

from fedjet.config.codec import DEFAULT_CHUNK
from fedjet.errors import DecodeError

LEVELS = {"int8": 127, "int4": 7, "int2": 1, "int1": 1}
BITS = {"int8": 8, "int4": 4, "int1": 1}
TRITS = 5  # ternary levels per byte
POWERS_OF_3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
TERNARY_THRESHOLD = 0.7  # x mean|x|: the approximately optimal cut for Gaussian-like values


def quantize(values: np.ndarray, bits: str, chunk: int = DEFAULT_CHUNK) -> tuple[bytes, bytes]:
    """(packed levels, float32 scales) for a flat float32 array."""
    n = values.size
    chunks = math.ceil(n / chunk) if n else 0
    padded = np.zeros(chunks * chunk, dtype=np.float32)
    padded[:n] = values
    blocks = padded.reshape(chunks, chunk)
    if bits == "int1":
        q, scales = _sign(blocks, n, chunk)
    elif bits == "int2":
        q, scales = _ternary(blocks)
    else:
        levels = LEVELS[bits]
        scales = (np.abs(blocks).max(axis=1) / levels).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        q = np.rint(blocks / safe[:, None]).clip(-levels, levels).astype(np.int8)
    return _pack(q.reshape(-1)[:n], bits), scales.astype(np.float32).tobytes()


def _sign(blocks: np.ndarray, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels ±1 and each chunk's mean magnitude over its real (unpadded) values."""
    counts = np.full(blocks.shape[0], chunk, dtype=np.float32)
    if blocks.shape[0] and n % chunk:
        counts[-1] = n % chunk
    scales = np.abs(blocks).sum(axis=1) / counts
    return np.where(blocks < 0, -1, 1).astype(np.int8), scales


def _ternary(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels -1/0/1: keep values above 0.7 x the chunk's mean magnitude, scaled by their mean."""
    magnitude = np.abs(blocks)
    cut = TERNARY_THRESHOLD * magnitude.mean(axis=1, keepdims=True)  # padding only lowers the cut
    kept = (magnitude > cut) & (magnitude > 0)
    count = kept.sum(axis=1)
    scales = np.where(count > 0, (magnitude * kept).sum(axis=1) / np.maximum(count, 1), 0.0)
    return (np.sign(blocks) * kept).astype(np.int8), scales


def packed_size(n: int, bits: str) -> int:
    return math.ceil(n / TRITS) if bits == "int2" else math.ceil(n * BITS[bits] / 8)


def dequantize(packed: bytes, scales_raw: bytes, n: int, bits: str, chunk: int) -> np.ndarray:
    """Inverse of :func:`quantize`; sizes are checked before anything is expanded."""
    chunks = math.ceil(n / chunk) if n else 0
    if len(scales_raw) != 4 * chunks:
        raise DecodeError(f"{len(scales_raw)} scale bytes for {chunks} chunks")
    if len(packed) != packed_size(n, bits):
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
    if bits == "int1":
        return np.packbits(q < 0, bitorder="little").tobytes()
    if bits == "int2":
        trits = np.append((q + 1).astype(np.uint8), np.ones(-q.size % TRITS, dtype=np.uint8))
        codes: np.ndarray = (trits.reshape(-1, TRITS) * POWERS_OF_3).sum(axis=1, dtype=np.uint8)
        return codes.tobytes()
    width = BITS[bits]
    per_byte = 8 // width
    codes = (q.astype(np.int16) & ((1 << width) - 1)).astype(np.uint8)
    codes = np.append(codes, np.zeros(-codes.size % per_byte, dtype=np.uint8)).reshape(-1, per_byte)
    shifts = (np.arange(per_byte) * width).astype(np.uint8)
    packed: np.ndarray = np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint8)
    return packed.tobytes()


def _unpack(packed: bytes, n: int, bits: str) -> np.ndarray:
    if bits == "int8":
        return np.frombuffer(packed, dtype=np.int8)
    raw = np.frombuffer(packed, dtype=np.uint8)
    if bits == "int1":
        negative = np.unpackbits(raw, count=n, bitorder="little")
        signs: np.ndarray = (1 - 2 * negative.astype(np.int8)).astype(np.int8)
        return signs
    if bits == "int2":
        if (raw >= 3**TRITS).any():
            raise DecodeError("int2 level out of range")
        trits = (raw[:, None] // POWERS_OF_3) % 3
        levels: np.ndarray = trits.reshape(-1)[:n].astype(np.int8) - 1
        return levels
    width = BITS[bits]
    per_byte, mask = 8 // width, (1 << width) - 1
    shifts = (np.arange(per_byte) * width).astype(np.uint8)
    codes = ((raw[:, None] >> shifts) & mask).reshape(-1)[:n].astype(np.int8)
    half = 1 << (width - 1)
    signed: np.ndarray = np.where(codes >= half, codes - (1 << width), codes).astype(np.int8)
    return signed
