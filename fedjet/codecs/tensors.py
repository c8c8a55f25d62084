"""Dense tensors as raw bytes, and the content hash of a weight dict."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from fedjet.errors import LimitError, SchemaError

# Wire dtype name -> (numpy dtype, torch dtype). Only these may cross the broker.
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
}
MAX_NAME_LEN = 512
MAX_RANK = 8


def dtype_name(tensor: torch.Tensor) -> str:
    for name, (_, torch_dtype) in DTYPES.items():
        if tensor.dtype == torch_dtype:
            return name
    raise SchemaError(f"dtype {tensor.dtype} cannot cross the wire; use one of {sorted(DTYPES)}")


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A flat little-endian numpy view (copies only when the tensor is not CPU-contiguous)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).numpy()


def check_shape(shape: object, max_elements: int) -> tuple[int, ...]:
    """Validate a declared shape before anything is allocated for it."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_RANK:
        raise SchemaError(f"shape must be a list of at most {MAX_RANK} ints, got {shape!r:.80}")
    dims: list[int] = []
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise SchemaError(f"shape dims must be non-negative ints, got {shape!r:.80}")
        dims.append(dim)
    if math.prod(dims) > max_elements:
        raise LimitError(f"shape {dims} declares {math.prod(dims)} elements > limit {max_elements}")
    return tuple(dims)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise SchemaError(f"tensor name must be a non-empty string, got {name!r:.80}")
    return name


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes in name order: the version identity."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(name.encode())
        digest.update(dtype_name(tensor).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(as_numpy(tensor).data.cast("B"))  # hashed in place, not copied
    return digest.hexdigest()
