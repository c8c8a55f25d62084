"""``fedjet bench codec``: wire size and speed of the full update pipeline.

Encode = error-feedback compression + framing + sealing (AES-GCM segments and the sender's
Ed25519 signature over a SHA-256 of the frame); decode = opening and checking the signature +
parsing + materialising dense tensors. Speeds are MB/s of dense float32 input; the physical
reference is a ``memcpy`` of the same dense buffer timed in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedjet.codecs import crypto
from fedjet.codecs.crypto import COORDINATOR, Boxes, Identity
from fedjet.codecs.feedback import compress_with_feedback
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import UpdateHeader, frame_update, open_sealed_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.codecs.sparse import SparseTensor

TARGETS = {"ratio": 100.0, "encode_vs_memcpy": 0.1, "decode_vs_memcpy": 0.25}


@dataclass
class CodecBench:
    params: int
    codec: str
    dense_bytes: int
    wire_bytes: int
    ratio: float
    encode_mb_s: float
    decode_mb_s: float
    memcpy_mb_s: float
    encode_vs_memcpy: float
    decode_vs_memcpy: float
    meets_targets: bool
    repeats: int


def model_like(params: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors shaped like a transformer's: one embedding-sized, several layer-sized, small ones."""
    rng = np.random.default_rng(seed)
    sizes = [params // 4] + [params // 8] * 5 + [params // 64] * 4
    sizes.append(params - sum(sizes))
    return {f"t{i:02d}": torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 1e-3) for i, n in enumerate(sizes)}


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run(params: int, density: float, codec: str | None = None, repeats: int = 5) -> CodecBench:
    spec = CodecSpec.parse(codec or f"topk:{density:g}+int8")
    tensors = model_like(params)
    dense_bytes = params * 4
    coordinator, worker = Identity.generate(COORDINATOR), Identity.generate("aws")
    sender = Boxes(worker, {COORDINATOR: coordinator.public})
    receiver = Boxes(coordinator, {"aws": worker.public})
    sender.to(COORDINATOR), receiver.to("aws")  # key agreement once, as services do
    header = UpdateHeader(
        job="bench", cloud="aws", worker="0", seq=1, base_version=0, samples=1, loss=1.0, codec=spec.text
    )
    residual = {n: torch.zeros_like(t) for n, t in tensors.items()}

    def encode() -> bytes:
        compressed, _ = compress_with_feedback(tensors, residual, spec)
        return crypto.seal_update(frame_update(header, compressed.entries), sender)

    encode_s, envelope = best_of(repeats, encode)
    limits = Limits()

    def decode() -> dict[str, torch.Tensor]:
        update = open_sealed_update(envelope, receiver, "aws", limits)
        return {n: t.to_dense() if isinstance(t, SparseTensor) else t for n, t in update.tensors.items()}

    decode_s, decoded = best_of(repeats, decode)
    source = np.concatenate([t.numpy() for t in tensors.values()])
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in before timing
    memcpy_s, _ = best_of(repeats * 4, lambda: np.copyto(target, source))
    assert set(decoded) == set(tensors)
    mb = dense_bytes / 1e6
    enc, dec, cpy = mb / encode_s, mb / decode_s, mb / memcpy_s
    ratio = dense_bytes / len(envelope)
    meets = (
        ratio >= TARGETS["ratio"]
        and enc >= TARGETS["encode_vs_memcpy"] * cpy
        and dec >= TARGETS["decode_vs_memcpy"] * cpy
    )
    return CodecBench(
        params=params,
        codec=spec.text,
        dense_bytes=dense_bytes,
        wire_bytes=len(envelope),
        ratio=ratio,
        encode_mb_s=enc,
        decode_mb_s=dec,
        memcpy_mb_s=cpy,
        encode_vs_memcpy=enc / cpy,
        decode_vs_memcpy=dec / cpy,
        meets_targets=meets,
        repeats=repeats,
    )


def as_dict(result: CodecBench) -> dict[str, Any]:
    return asdict(result) | {"targets": TARGETS}


def describe(result: CodecBench) -> str:
    return "\n".join(
        [
            f"codec {result.codec} on {result.params:,} float32 parameters ({result.dense_bytes / 1e6:.1f} MB dense)",
            f"  wire bytes   {result.wire_bytes:,}  ratio {result.ratio:.1f}x (target >= {TARGETS['ratio']:.0f}x)",
            f"  encode       {result.encode_mb_s:,.0f} MB/s = {result.encode_vs_memcpy:.2f} x memcpy (target >= 0.10)",
            f"  decode       {result.decode_mb_s:,.0f} MB/s = {result.decode_vs_memcpy:.2f} x memcpy (target >= 0.25)",
            f"  memcpy       {result.memcpy_mb_s:,.0f} MB/s (same buffer, same run)",
            f"  meets targets: {result.meets_targets}",
        ]
    )
