"""Compact sorted indices: delta-encoded LEB128 varints, a bitmap, or Elias-Fano, whichever
is smallest.

Elias-Fano stores each index's low ``l = floor(log2(numel / count))`` bits verbatim and its
high bits as a unary bit vector: about ``2 + log2(numel / count)`` bits per index, a third
less than varints at 1-10 % density, where indices are most of an update's bytes.
All directions are vectorised with numpy; decoding checks that indices strictly increase
and stay below the tensor size, so a hostile frame cannot scatter out of bounds.
"""

from __future__ import annotations

import math

import numpy as np

from fedjet.errors import DecodeError

MAX_VARINT_BYTES = 10


def encode_indices(indices: np.ndarray, numel: int) -> tuple[str, bytes]:
    """("varint" | "bitmap" | "ef", payload) for sorted unique ``indices`` < ``numel``."""
    bitmap_size, ef_size = math.ceil(numel / 8), sum(elias_fano_sizes(indices.size, numel))
    if indices.size and ef_size < min(indices.size, bitmap_size):  # a varint takes >= 1 byte
        return "ef", encode_elias_fano(indices, numel)
    varint = encode_varints(np.diff(indices, prepend=0).astype(np.uint64)) if indices.size else b""
    if len(varint) <= min(bitmap_size, ef_size):
        return "varint", varint
    if ef_size < bitmap_size:
        return "ef", encode_elias_fano(indices, numel)
    bits = np.zeros(numel, dtype=bool)
    bits[indices] = True
    return "bitmap", np.packbits(bits, bitorder="little").tobytes()


def decode_indices(kind: str, payload: bytes, count: int, numel: int) -> np.ndarray:
    if kind == "ef":
        return decode_elias_fano(payload, count, numel)
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


def _low_bits(count: int, numel: int) -> int:
    """``floor(log2(numel / count))``: the width that keeps the unary part near 2 bits/index."""
    return max(0, (numel // count).bit_length() - 1) if count else 0


def elias_fano_sizes(count: int, numel: int) -> tuple[int, int]:
    """Bytes of the unary high part and of the packed low bits (both fixed by count, numel)."""
    low = _low_bits(count, numel)
    return math.ceil((count + (numel >> low) + 1) / 8), math.ceil(count * low / 8)


def encode_elias_fano(indices: np.ndarray, numel: int) -> bytes:
    count = indices.size
    low = _low_bits(count, numel)
    idx = indices.astype(np.int64, copy=False)
    upper = np.zeros(count + (numel >> low) + 1, dtype=bool)
    upper[(idx >> low) + np.arange(count)] = True
    out = np.packbits(upper, bitorder="little").tobytes()
    if low:
        bits = (idx[:, None] >> np.arange(low, dtype=np.int64)) & 1
        out += np.packbits(bits.astype(bool).reshape(-1), bitorder="little").tobytes()
    return out


def decode_elias_fano(payload: bytes, count: int, numel: int) -> np.ndarray:
    low = _low_bits(count, numel)
    upper_size, low_size = elias_fano_sizes(count, numel)
    if len(payload) != upper_size + low_size:
        raise DecodeError(f"elias-fano payload of {len(payload)} bytes for {count} of {numel} values")
    if count == 0:
        return np.empty(0, dtype=np.int64)
    data = np.frombuffer(payload, dtype=np.uint8)
    upper = np.unpackbits(data[:upper_size], count=count + (numel >> low) + 1, bitorder="little")
    ones = np.flatnonzero(upper)
    if ones.size != count:
        raise DecodeError(f"elias-fano high part holds {ones.size} indices, manifest says {count}")
    indices = (ones.astype(np.int64) - np.arange(count, dtype=np.int64)) << low
    if low:
        bits = np.unpackbits(data[upper_size:], count=count * low, bitorder="little").reshape(count, low)
        indices |= bits.astype(np.int64) @ (np.int64(1) << np.arange(low, dtype=np.int64))
    if (np.diff(indices) <= 0).any() or int(indices[-1]) >= numel:
        raise DecodeError(f"elias-fano indices must strictly increase below {numel}")
    return indices
