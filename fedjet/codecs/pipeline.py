"""Tensor dicts <-> frame entries under a :class:`CodecSpec` (``dense``, ``topk:0.01+int8`` ...).

Stages, in order: top-k sparsification (per tensor or global, at the density a warm-up
gives the version) or low-rank factors of each matrix (:mod:`fedjet.codecs.lowrank`),
quantization (fp16, or int8/int4/int2/int1 with a scale per chunk), compact indices (varint
deltas, bitmap or Elias-Fano, whichever is smallest).
:func:`compress` also returns what the receiver will reconstruct, so the caller can keep the
error-feedback residual exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedjet.codecs.frame import Limits, field
from fedjet.codecs.indices import decode_indices, encode_indices
from fedjet.codecs.lowrank import effective_rank, factorize, matrix_shape, rebuild
from fedjet.codecs.quant import LEVELS, dequantize, quantize
from fedjet.codecs.sparse import SparseTensor, TensorLike
from fedjet.codecs.tensors import DTYPES, as_numpy, check_name, check_shape, dtype_name
from fedjet.codecs.topk import above, kept_count, sample_size, sampled_threshold, topk_indices
from fedjet.config.codec import MAX_QUANT_CHUNK, CodecSpec
from fedjet.errors import DecodeError, LimitError, SchemaError

QUANTS = ("raw", "f16", "int8", "int4")
__all__ = ["QUANTS", "CodecSpec", "Compressed", "compress", "decode_tensors"]


@dataclass
class Compressed:
    entries: list[dict[str, Any]]
    sent: dict[str, TensorLike]  # exactly what the receiver reconstructs


def compress(tensors: dict[str, torch.Tensor], spec: CodecSpec, seed: int = 0) -> Compressed:
    """Encode ``tensors`` (float32 or float16) under ``spec``."""
    names = sorted(tensors)
    arrays = {n: as_numpy(tensors[n]) for n in names}
    if spec.density is None:
        kept: dict[str, np.ndarray | None] = dict.fromkeys(names)
    elif spec.scope == "global":
        kept = dict(_global_topk(arrays, spec.density, seed))
    else:
        kept = {n: topk_indices(a, kept_count(a.size, spec.density), seed) for n, a in arrays.items()}
    entries, sent = [], {}
    for name in names:
        rank = 0 if spec.rank is None else effective_rank(tuple(tensors[name].shape), spec.rank)
        reconstructed: TensorLike
        if rank:
            entry, reconstructed = _encode_lowrank(name, tensors[name], arrays[name], rank, spec, seed)
        else:
            entry, reconstructed = _encode_one(name, tensors[name], arrays[name], kept[name], spec)
        entries.append(entry)
        sent[name] = reconstructed
    return Compressed(entries, sent)


def _encode_one(
    name: str, tensor: torch.Tensor, flat: np.ndarray, indices: np.ndarray | None, spec: CodecSpec
) -> tuple[dict[str, Any], TensorLike]:
    shape = tuple(tensor.shape)
    if indices is not None and indices.size == flat.size:
        indices = None  # every value kept (a warm-up at density 1, a tiny tensor): no indices to send
    values = flat if indices is None else flat[indices]
    entry: dict[str, Any] = {"n": name, "s": list(shape), "d": dtype_name(tensor), "k": int(values.size)}
    fields, decoded = _encode_values(values, spec)
    entry |= fields
    if indices is None:
        entry["e"] = "dense"
        out = torch.from_numpy(np.ascontiguousarray(decoded)).reshape(shape)
        return entry, out.to(tensor.dtype) if spec.quant == "raw" else out
    kind, payload = encode_indices(indices, flat.size)
    entry |= {"e": "sparse", "ix": kind, "i": payload}
    sparse = SparseTensor(shape, torch.from_numpy(indices), torch.from_numpy(decoded.astype(np.float32, copy=False)))
    return entry, sparse


def _encode_values(values: np.ndarray, spec: CodecSpec) -> tuple[dict[str, Any], np.ndarray]:
    """The quantization stage: wire fields for ``values`` and what they decode to."""
    if spec.quant == "raw":
        return {"q": "raw", "v": values.tobytes()}, values
    if spec.quant == "f16":
        half = values.astype("<f2")
        return {"q": "f16", "v": half.tobytes()}, half.astype(np.float32)
    packed, scales = quantize(values.astype(np.float32, copy=False), spec.quant, spec.chunk)
    fields = {"q": spec.quant, "v": packed, "sc": scales, "qc": spec.chunk}
    return fields, dequantize(packed, scales, values.size, spec.quant, spec.chunk)


def _encode_lowrank(
    name: str, tensor: torch.Tensor, flat: np.ndarray, rank: int, spec: CodecSpec, seed: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Rank-``rank`` factors of one matrix, each quantized on its own scale (P's entries are
    O(1/sqrt(m)), Q's carry the singular values); sent as float32 whatever the tensor."""
    shape = tuple(tensor.shape)
    m, _ = matrix_shape(shape)
    factors = factorize(flat.astype(np.float32, copy=False).reshape(matrix_shape(shape)), rank, seed)
    p_fields, p = _encode_values(factors[: rank * m], spec)
    q_fields, q = _encode_values(factors[rank * m :], spec)
    entry = {"n": name, "s": list(shape), "d": "float32", "k": int(factors.size), "e": "lowrank", "r": rank}
    entry |= {"P": p_fields, "Q": q_fields}
    return entry, torch.from_numpy(rebuild(np.concatenate([p, q]), shape, rank)).reshape(shape)


def _global_topk(arrays: dict[str, np.ndarray], density: float, seed: int) -> dict[str, np.ndarray]:
    """One magnitude threshold across every tensor (DGC's sampled estimate, then exact trim)."""
    total = sum(a.size for a in arrays.values())
    k = kept_count(total, density)
    rng = np.random.default_rng(seed)
    share = sample_size(total) / max(total, 1)
    sample = np.concatenate(
        [np.abs(a[rng.integers(0, a.size, size=max(1, math.ceil(share * a.size)))]) for a in arrays.values() if a.size]
    )
    fraction = k / total
    while True:
        threshold = sampled_threshold(sample, fraction)
        candidates = {n: above(a, threshold) for n, a in arrays.items()}
        if sum(c.size for c in candidates.values()) >= k:
            break
        fraction *= 2
    count = sum(c.size for c in candidates.values())
    if count == k:
        return candidates
    magnitudes = np.concatenate([np.abs(arrays[n][c]) for n, c in candidates.items()])
    keep = np.zeros(count, dtype=bool)
    keep[np.argpartition(magnitudes, count - k)[count - k :]] = True
    out, offset = {}, 0
    for name, cand in candidates.items():
        out[name] = cand[keep[offset : offset + cand.size]].astype(np.int64)
        offset += cand.size
    return out


def decode_tensors(entries: list[dict[str, Any]], limits: Limits) -> dict[str, TensorLike]:
    """Frame entries back to tensors: dense ``torch.Tensor`` or :class:`SparseTensor`. Each
    entry's values are let go once decoded (the entries are spent): a whole-model frame is not
    held twice over, as packed bytes and as tensors, while it is decoded."""
    out: dict[str, TensorLike] = {}
    total = 0
    for entry in entries:
        name = check_name(field(entry, "n", str))
        if name in out:
            raise SchemaError(f"tensor {name!r} appears twice")
        shape = check_shape(field(entry, "s", list), limits.max_elements)
        numel = math.prod(shape)
        total += numel
        if total > limits.max_total_elements:
            raise LimitError(f"frame declares more than {limits.max_total_elements} elements")
        dtype = field(entry, "d", str)
        if dtype not in DTYPES:
            raise SchemaError(f"{name}: dtype {dtype!r:.20} not allowed")
        out[name] = _decode_one(name, entry, shape, numel, dtype)
        entry.pop("v", None)
    return out


def _decode_one(name: str, entry: dict[str, Any], shape: tuple[int, ...], numel: int, dtype: str) -> TensorLike:
    encoding = field(entry, "e", str)
    count = field(entry, "k", int)
    if encoding == "lowrank":
        return _decode_lowrank(name, entry, shape, count, dtype)
    if encoding not in ("dense", "sparse"):
        raise SchemaError(f"{name}: unknown encoding {encoding!r:.20}")
    if not 0 <= count <= numel or (encoding == "dense" and count != numel):
        raise DecodeError(f"{name}: {count} kept values for {numel} elements")
    values = _decode_values(name, entry, count, dtype)
    if encoding == "dense":
        return torch.from_numpy(values).reshape(shape)
    indices = decode_indices(field(entry, "ix", str), field(entry, "i", bytes), count, numel)
    return SparseTensor(shape, torch.from_numpy(indices), torch.from_numpy(values.astype(np.float32, copy=False)))


def _decode_lowrank(name: str, entry: dict[str, Any], shape: tuple[int, ...], count: int, dtype: str) -> torch.Tensor:
    rank = field(entry, "r", int)
    m, n = matrix_shape(shape)
    if dtype != "float32" or not 1 <= rank <= min(m, n) or count != rank * (m + n):
        raise DecodeError(f"{name}: {count} low-rank values of rank {rank} do not fit {shape}")
    p = _decode_values(name, field(entry, "P", dict), rank * m, dtype)
    q = _decode_values(name, field(entry, "Q", dict), rank * n, dtype)
    factors = np.concatenate([p, q]).astype(np.float32, copy=False)
    return torch.from_numpy(rebuild(factors, shape, rank)).reshape(shape)


def _decode_values(name: str, entry: dict[str, Any], count: int, dtype: str) -> np.ndarray:
    quant = field(entry, "q", str, default="raw")
    raw = field(entry, "v", bytes)
    if quant == "raw":
        np_dtype = DTYPES[dtype][0]
        if len(raw) != count * np_dtype.itemsize:
            raise DecodeError(f"{name}: {len(raw)} value bytes do not fit {count} values of {dtype}")
        values = np.frombuffer(raw, dtype=np_dtype)
        # a writable frame's values become the tensor where they lie (the frame lives on in
        # it); read-only bytes are copied, so every decoded tensor can be written to
        return values if values.flags.writeable else values.copy()
    if quant == "f16":
        if len(raw) != count * 2:
            raise DecodeError(f"{name}: {len(raw)} fp16 bytes do not fit {count} values")
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if quant not in LEVELS:
        raise SchemaError(f"{name}: unknown quantization {quant!r:.20}")
    chunk = field(entry, "qc", int)
    if not 1 <= chunk <= MAX_QUANT_CHUNK:
        raise DecodeError(f"{name}: quantization chunk {chunk} out of range")
    return dequantize(raw, field(entry, "sc", bytes), count, quant, chunk)
