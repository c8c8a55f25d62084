"""Compact sorted indices: delta-encoded LEB128 varints, or a bitmap, whichever is smaller.

Both directions are vectorised with numpy; decoding checks that indices strictly increase
and stay below the tensor size, so a hostile frame cannot scatter out of bounds.
"""

from __future__ import annotations

import math

import numpy as np

from fedjet.errors import DecodeError

MAX_VARINT_BYTES = 10


def encode_indices(indices: np.ndarray, numel: int) -> tuple[str, bytes]:
    """("varint" | "bitmap", payload) for sorted unique ``indices`` < ``numel``."""
    varint = encode_varints(np.diff(indices, prepend=0).astype(np.uint64)) if indices.size else b""
    if len(varint) <= math.ceil(numel / 8):
        return "varint", varint
    bits = np.zeros(numel, dtype=bool)
    bits[indices] = True
    return "bitmap", np.packbits(bits, bitorder="little").tobytes()


def decode_indices(kind: str, payload: bytes, count: int, numel: int) -> np.ndarray:
    if kind == "bitmap":
        if len(payload) != math.ceil(numel / 8):
            raise DecodeError(f"bitmap of {len(payload)} bytes for {numel} values")
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=numel, bitorder="little")
        indices = np.flatnonzero(bits).astype(np.int64)
        if indices.size != count:
            raise DecodeError(f"bitmap holds {indices.size} indices, manifest says {count}")
        return indices
    if kind != "varint":
        raise DecodeError(f"unknown index encoding {kind!r:.20}")
    deltas = decode_varints(payload, count)
    if count and (deltas[1:] == 0).any():
        raise DecodeError("indices must strictly increase")
    if count and (deltas >= np.uint64(numel)).any():  # also keeps the running sum far from overflow
        raise DecodeError(f"index delta out of range for {numel} values")
    indices = np.cumsum(deltas, dtype=np.uint64)
    if count and int(indices[-1]) >= numel:
        raise DecodeError(f"index {int(indices[-1])} out of range for {numel} values")
    return indices.astype(np.int64)


def encode_varints(values: np.ndarray) -> bytes:
    """LEB128 of unsigned 64-bit values, vectorised over byte positions."""
    values = values.astype(np.uint64)
    if values.size == 0:
        return b""
    width = max(1, -(-int(values.max()).bit_length() // 7))
    lengths = np.ones(values.size, dtype=np.int64)
    for i in range(1, width):
        lengths += values >= (np.uint64(1) << np.uint64(7 * i))
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for i in range(width):
        active = np.flatnonzero(lengths > i) if i else np.arange(values.size)
        chunk = ((values[active] >> np.uint64(7 * i)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[active] + i] = chunk | ((lengths[active] > i + 1).astype(np.uint8) << 7)
    return out.tobytes()


def decode_varints(payload: bytes, count: int) -> np.ndarray:
    data = np.frombuffer(payload, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count or (count and ends[-1] != data.size - 1) or (not count and data.size):
        raise DecodeError(f"varint stream holds {ends.size} values, manifest says {count}")
    if not count:
        return np.empty(0, dtype=np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if (ends - starts + 1 > MAX_VARINT_BYTES).any():
        raise DecodeError("varint longer than 10 bytes")
    owner = np.repeat(np.arange(count), ends - starts + 1)
    position = np.arange(data.size) - starts[owner]
    parts = (data & 0x7F).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    return np.bitwise_or.reduceat(parts, starts)
