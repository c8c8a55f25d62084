"""Lossy downlink with error feedback on the coordinator's side (DoubleSqueeze, EF21).

The coordinator keeps two weight sets: the true global ``W`` it aggregates on, and the
*broadcast view* ``B`` that every worker holds and trains from. Each version it sends
``C(W - B)`` under the job's ``+down`` codec and every party sets ``B += C(W - B)``. What a
version could not carry is still in ``W - B`` (the residual) and goes out with a later one:
delayed, never lost. Workers' deltas (measured from ``B``) are applied to ``W``.

Both sides rebuild ``B`` with :func:`apply_change` from the same decoded values, so the view
is bit-identical everywhere and the signed view hash checks it.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch

from fedjet.codecs.frame import Limits, pack_frame, unpack_frame
from fedjet.codecs.messages import GlobalHeader, GlobalVersion
from fedjet.codecs.pipeline import CodecSpec, compress, decode_tensors
from fedjet.codecs.sparse import TensorLike, add_scaled_, shape_of
from fedjet.codecs.tensors import weights_hash
from fedjet.errors import SchemaError, ValidationError
from fedjet.weights import Weights

VIEW_KEY = "view"  # in the frame header: the entries are added to the base, not new values


def view_step(true: Weights, view: Weights, spec: CodecSpec, version: int) -> tuple[list[dict[str, Any]], Weights]:
    """Entries carrying ``C(true - view)`` and the new view ``view + C(true - view)``."""
    residual = {n: true[n].to(torch.float32) - view[n] for n in sorted(true)}
    compressed = compress(residual, spec.at(version), seed=version)
    return compressed.entries, apply_change(view, compressed.sent)


def apply_change(view: Weights, change: dict[str, TensorLike]) -> Weights:
    """A new view: ``view + change`` (``view`` is left as it is)."""
    out = {}
    for name, base in view.items():
        rebuilt = base.to(torch.float32).clone()
        add_scaled_(rebuilt, change[name], 1.0)
        out[name] = rebuilt
    return out


def encode_view(header: GlobalHeader, entries: list[dict[str, Any]]) -> bytes:
    """A view frame: ``header.hash`` is the new view's hash, ``header.delta_from`` its base."""
    return pack_frame("global", {**asdict(header), VIEW_KEY: True}, entries)


def next_view_frame(true: Weights, view: Weights, spec: CodecSpec, header: GlobalHeader) -> tuple[bytes, Weights, str]:
    """The coordinator's step: (frame, new view, its hash) for version ``header.version``."""
    entries, new_view = view_step(true, view, spec, header.version)
    digest = weights_hash(new_view)
    frame = encode_view(replace(header, hash=digest, final=False), entries)
    return frame, new_view, digest


def decode_view(data: bytes, limits: Limits, base: Weights) -> GlobalVersion:
    """A follower's step: ``base`` (the previous view) plus the frame's change."""
    raw_header, entries = unpack_frame(data, limits, "global")
    if raw_header.get(VIEW_KEY) is not True:
        raise SchemaError("expected a view frame, got a global version")
    header = GlobalHeader.from_wire(raw_header)
    change = decode_tensors(entries, limits)
    if set(change) != set(base):
        raise ValidationError(f"view {header.version}: names do not match view {header.delta_from}")
    for name, tensor in change.items():
        if shape_of(tensor) != tuple(base[name].shape):
            raise ValidationError(f"view {header.version}: {name} shape differs from its base")
    return GlobalVersion(header, apply_change(base, change))
