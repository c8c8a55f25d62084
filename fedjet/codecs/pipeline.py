"""Codec specs (``dense``, ``topk:0.01+int8`` ...) and tensor-dict <-> frame entries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedjet.codecs.frame import Limits, field
from fedjet.codecs.tensors import DTYPES, as_numpy, check_name, check_shape, dtype_name
from fedjet.errors import ConfigError, DecodeError, LimitError, SchemaError


@dataclass(frozen=True)
class CodecSpec:
    """Parsed ``--codec`` text. ``density`` None means dense."""

    text: str
    density: float | None = None
    quant: str | None = None  # None (float32), "int8" or "int4"

    @classmethod
    def dense(cls) -> CodecSpec:
        return cls("dense")

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        if text.strip() == "dense":
            return cls.dense()
        raise ConfigError(f"unknown codec {text!r}")


def encode_tensors(tensors: dict[str, torch.Tensor], spec: CodecSpec) -> list[dict[str, Any]]:
    entries = []
    for name in sorted(tensors):
        tensor = tensors[name]
        entries.append(
            {
                "n": name,
                "s": list(tensor.shape),
                "d": dtype_name(tensor),
                "k": tensor.numel(),
                "e": "dense",
                "v": as_numpy(tensor).tobytes(),
            }
        )
    return entries


def decode_tensors(entries: list[dict[str, Any]], limits: Limits) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    total = 0
    for entry in entries:
        name = check_name(field(entry, "n", str))
        if name in out:
            raise SchemaError(f"tensor {name!r} appears twice")
        shape = check_shape(field(entry, "s", list), limits.max_elements)
        total += math.prod(shape)
        if total > limits.max_total_elements:
            raise LimitError(f"frame declares more than {limits.max_total_elements} elements")
        dtype = field(entry, "d", str)
        if dtype not in DTYPES:
            raise SchemaError(f"{name}: dtype {dtype!r:.20} not allowed")
        encoding = field(entry, "e", str)
        if encoding != "dense":
            raise SchemaError(f"{name}: unknown encoding {encoding!r:.20}")
        out[name] = _decode_dense(name, entry, shape, dtype)
    return out


def _decode_dense(name: str, entry: dict[str, Any], shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    raw = field(entry, "v", bytes)
    np_dtype, torch_dtype = DTYPES[dtype]
    if len(raw) != math.prod(shape) * np_dtype.itemsize:
        raise DecodeError(f"{name}: {len(raw)} value bytes do not fit shape {list(shape)} of {dtype}")
    array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    return torch.from_numpy(array.copy()).to(torch_dtype)
