"""A sparse tensor as it arrives off the wire: flat indices and values into a known shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseTensor:
    """``values[j]`` belongs at flat position ``indices[j]`` of a tensor of ``shape``."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, strictly increasing
    values: torch.Tensor  # float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.reshape(self.shape)


TensorLike = torch.Tensor | SparseTensor


def shape_of(t: TensorLike) -> tuple[int, ...]:
    return t.shape if isinstance(t, SparseTensor) else tuple(t.shape)


def values_of(t: TensorLike) -> torch.Tensor:
    return t.values if isinstance(t, SparseTensor) else t


def add_scaled_(acc: torch.Tensor, t: TensorLike, coef: float) -> None:
    """``acc += coef * t`` in place, touching only the kept entries of a sparse ``t``."""
    if isinstance(t, SparseTensor):
        acc.view(-1).index_add_(0, t.indices, t.values, alpha=coef)
    else:
        acc.add_(t, alpha=coef)
