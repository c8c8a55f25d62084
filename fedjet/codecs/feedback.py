"""Error feedback (Deep Gradient Compression, EF-SGD): what a lossy codec did not send is
kept as a residual and added to the next update, so nothing is lost, only delayed.

Invariant (tested): the sum of everything sent plus the final residual equals the sum of the
true updates.
"""

from __future__ import annotations

import torch

from fedjet.codecs.pipeline import CodecSpec, Compressed, compress
from fedjet.codecs.sparse import SparseTensor
from fedjet.weights import Weights


def is_lossless(spec: CodecSpec) -> bool:
    return spec.lossless


def compress_with_feedback(
    update: Weights, carry: Weights | None, spec: CodecSpec, seed: int = 0
) -> tuple[Compressed, Weights | None]:
    """Compress ``update + carry``; return it with the new residual (None when lossless).

    ``carry`` is consumed: its buffers are reused for the new residual, so the worker keeps
    one residual-sized buffer instead of allocating a model's worth per update.
    """
    if carry is None:
        acc = {n: t.detach().to(torch.float32).clone() for n, t in update.items()}
    else:
        acc = carry
        for name, tensor in update.items():
            acc[name].add_(tensor.detach())
    compressed = compress(acc, spec, seed=seed)
    if is_lossless(spec):
        return compressed, None
    for name, sent in compressed.sent.items():
        if isinstance(sent, SparseTensor):
            acc[name].view(-1).index_add_(0, sent.indices, sent.values, alpha=-1.0)
        else:
            acc[name].sub_(sent.to(torch.float32))
    return compressed, acc
