"""Weights as one flat vector and back, in name order: what secure aggregation masks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from fedjet.weights import Weights


def flatten(tensors: Weights) -> npt.NDArray[np.float32]:
    """One float32 vector of ``tensors`` in name order (the coordinator unflattens alike)."""
    parts = [tensors[n].detach().to("cpu", torch.float32).reshape(-1) for n in sorted(tensors)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)


def unflatten(flat: npt.NDArray[np.float32], like: Weights) -> Weights:
    out, at = {}, 0
    for name in sorted(like):
        t = like[name]
        out[name] = torch.from_numpy(flat[at : at + t.numel()].copy()).reshape(t.shape).to(t.dtype)
        at += t.numel()
    if at != flat.size:
        raise ValueError(f"{flat.size} values for tensors of {at}")
    return out
