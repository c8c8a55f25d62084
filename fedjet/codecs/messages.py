"""The two messages that cross the broker: a worker's update and a global version."""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from fedjet.codecs import crypto
from fedjet.codecs.crypto import Boxes
from fedjet.codecs.frame import FramePieces, Limits, frame_pieces, pack_frame, unpack_frame
from fedjet.codecs.frame import field as read
from fedjet.codecs.heads import MAX_HEAD_BYTES as MAX_HEAD_BYTES
from fedjet.codecs.heads import GlobalHead as GlobalHead
from fedjet.codecs.heads import GlobalHeader as GlobalHeader
from fedjet.codecs.heads import ViewRef as ViewRef
from fedjet.codecs.indices import encode_indices
from fedjet.codecs.pipeline import CodecSpec, compress, decode_tensors
from fedjet.codecs.sparse import SparseTensor, TensorLike, shape_of
from fedjet.codecs.tensors import as_numpy, dtype_name
from fedjet.errors import AuthenticationError, SchemaError, ValidationError

RETIRE = "retire"  # no tensors: the sender will send no more (e.g. its privacy budget is spent)
UPDATE_KINDS = ("delta", "gradient", RETIRE)
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, kw_only=True)
class DPClaim:
    """What a DP-SGD worker says it spent: enough for the coordinator to recompute ε."""

    epsilon: float
    delta: float
    noise: float
    sample_rate: float
    clip: float
    steps: int
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        numbers = (self.epsilon, self.delta, self.noise, self.sample_rate, self.clip)
        if not all(math.isfinite(x) and x >= 0 for x in numbers) or self.steps < 0:
            raise SchemaError("DP claims must be finite and non-negative")
        if not 0 < self.sample_rate <= 1 or not 0 < self.delta < 1:
            raise SchemaError("DP sample rate must be in (0, 1] and delta in (0, 1)")

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> DPClaim:
        return cls(
            epsilon=read(raw, "epsilon", float),
            delta=read(raw, "delta", float),
            noise=read(raw, "noise", float),
            sample_rate=read(raw, "sample_rate", float),
            clip=read(raw, "clip", float),
            steps=read(raw, "steps", int),
            accountant=read(raw, "accountant", str, default="rdp"),
        )


@dataclass(frozen=True, kw_only=True)
class UpdateHeader:
    """Who sent an update, from which global version, and what it cost to make."""

    job: str
    cloud: str
    worker: str
    seq: int
    base_version: int
    samples: int
    loss: float
    kind: str = "delta"
    codec: str = "dense"
    tokens: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    sent_unix: float = 0.0
    data_tokens: int = 0  # tokens in the cloud's training set (``samples`` counts its windows)
    heldout_loss: float | None = None  # loss on a held-out slice of the cloud's own data: a number, never text
    dp: DPClaim | None = None  # a DP job's privacy spent so far, which the coordinator checks

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise SchemaError(f"update kind must be one of {UPDATE_KINDS}, got {self.kind!r:.40}")
        if min(self.seq, self.base_version, self.samples, self.tokens, self.data_tokens) < 0:
            raise SchemaError("seq, base_version, samples, tokens and data_tokens must be non-negative")
        if self.heldout_loss is not None and not (math.isfinite(self.heldout_loss) and self.heldout_loss >= 0):
            raise SchemaError(f"held-out loss must be finite and >= 0, got {self.heldout_loss}")
        if not math.isfinite(self.loss):
            raise SchemaError(f"reported loss must be finite, got {self.loss}")
        for name in ("compute_s", "wall_s", "sent_unix"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SchemaError(f"{name} must be finite and >= 0, got {value}")
        for kind, value in (("job", self.job), ("cloud", self.cloud), ("worker", self.worker)):
            if not _TOKEN.fullmatch(value):
                raise SchemaError(f"{kind} name {value!r:.40} must match [A-Za-z0-9_-]{{1,64}}")

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> UpdateHeader:
        return cls(
            job=read(raw, "job", str),
            cloud=read(raw, "cloud", str),
            worker=read(raw, "worker", str),
            seq=read(raw, "seq", int),
            base_version=read(raw, "base_version", int),
            samples=read(raw, "samples", int),
            loss=read(raw, "loss", float),
            kind=read(raw, "kind", str, default="delta"),
            codec=read(raw, "codec", str, default="dense"),
            tokens=read(raw, "tokens", int, default=0),
            compute_s=read(raw, "compute_s", float, default=0.0),
            wall_s=read(raw, "wall_s", float, default=0.0),
            sent_unix=read(raw, "sent_unix", float, default=0.0),
            data_tokens=read(raw, "data_tokens", int, default=0),
            heldout_loss=read(raw, "heldout_loss", (float, type(None)), default=None),
            dp=DPClaim.from_wire(read(raw, "dp", dict)) if raw.get("dp") is not None else None,
        )


@dataclass(frozen=True)
class Update:
    header: UpdateHeader
    tensors: dict[str, TensorLike]


@dataclass(frozen=True)
class GlobalVersion:
    header: GlobalHeader
    tensors: dict[str, torch.Tensor]


def frame_update(header: UpdateHeader, entries: list[dict[str, Any]]) -> bytes:
    """Frame already-compressed entries (the worker compresses with error feedback)."""
    return pack_frame("update", asdict(header), entries)


def encode_update(update: Update, spec: CodecSpec) -> bytes:
    """Compress dense tensors under ``spec`` and frame them (no error feedback)."""
    dense = {n: t for n, t in update.tensors.items() if isinstance(t, torch.Tensor)}
    if len(dense) != len(update.tensors):
        raise SchemaError("encode_update takes dense tensors; frame sparse ones with frame_update")
    header = update.header if update.header.codec == spec.text else replace(update.header, codec=spec.text)
    return frame_update(header, compress(dense, spec).entries)


def decode_update(data: bytes, limits: Limits) -> Update:
    raw_header, entries = unpack_frame(data, limits, "update")
    header = UpdateHeader.from_wire(raw_header)
    return Update(header, decode_tensors(entries, limits))


def open_sealed_update(
    envelope: bytes,
    boxes: Boxes,
    subject_cloud: str,
    limits: Limits,
    *,
    members: Collection[str] | None = None,
    legacy: bool = False,
) -> Update:
    """What the coordinator does with bytes off an update subject: decrypt, authenticate, parse.

    The sealing key must belong to the cloud whose subject carried the message (and to
    ``members``, default every peer), and the frame must name that cloud: a message moved to
    another cloud's subject is refused before it is decrypted. ``legacy`` also reads
    version-1 envelopes (replaying a store recorded before version 2).
    """
    allowed = set(boxes.peers if members is None else members) & {subject_cloud}
    max_bytes = crypto.envelope_limit(limits.max_frame_bytes)
    sender, frame = crypto.open_update(envelope, boxes, max_bytes, senders=allowed, legacy=legacy)
    return read_opened_update(frame, sender, limits)


def read_opened_update(frame: bytes, sender: str, limits: Limits) -> Update:
    """Parse a frame that ``sender``'s key opened; the frame must name that cloud."""
    update = decode_update(frame, limits)
    if update.header.cloud != sender:
        raise AuthenticationError(f"update sealed by {sender!r} claims cloud {update.header.cloud!r:.40}")
    return update


def encode_global(
    version: GlobalVersion, base: dict[str, torch.Tensor] | None = None, base_version: int = -1
) -> tuple[FramePieces, GlobalHeader]:
    """Dense weights, or, when ``base`` is given and it is less than half the size, only
    the values that changed since ``base`` (sent as the new values, so rebuilding is exact).
    Returns the frame and the header it carries (which says what was decided). The frame is
    pieces that view the weights' memory (a version can be the whole model): nothing is copied
    until it is read, and the weights must stay unchanged until then."""
    if base is not None:
        entries = delta_entries(version.tensors, base)
        if entries is not None:
            header = replace(version.header, delta_from=base_version)
            return frame_pieces("global", asdict(header), entries), header
    header = replace(version.header, delta_from=-1)
    return frame_pieces("global", asdict(header), dense_entries(version.tensors)), header


def dense_entries(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """What ``compress(tensors, CodecSpec.dense())`` writes, with each tensor's values as a
    view of its memory instead of a copy."""
    entries = []
    for name in sorted(tensors):
        tensor, flat = tensors[name], as_numpy(tensors[name])
        entry = {"n": name, "s": list(tensor.shape), "d": dtype_name(tensor), "k": int(flat.size)}
        entries.append(entry | {"q": "raw", "v": flat.data.cast("B"), "e": "dense"})
    return entries


def delta_entries(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[dict[str, Any]] | None:
    """Sparse entries holding the new value of every element whose bits changed, or None when
    that is not at least twice as small as sending everything."""
    if set(new) != set(base):
        return None
    if not _changes_fit(new, base):  # most elements changed: no entry is built, no copy made
        return None
    entries, size, dense = [], 0, 0
    for name in sorted(new):
        after, before = as_numpy(new[name]), as_numpy(base[name])
        if after.shape != before.shape or after.dtype != before.dtype:
            return None
        if new[name] is base[name]:  # the same tensor (a fragment round left it): nothing changed
            changed = np.empty(0, dtype=np.int64)
        else:
            differs = after.view(np.uint32) != before.view(np.uint32)  # bits, not values
            if np.count_nonzero(differs) * 2 > after.size:  # mostly changed: its values whole, no indices, no copy
                entries += dense_entries({name: new[name]})
                size += after.nbytes
                dense += after.nbytes
                continue
            changed = np.flatnonzero(differs)
        kind, payload = encode_indices(changed, after.size)
        values = after[changed].data.cast("B")  # one copy (the indexing); packed as it is
        size += len(payload) + len(values)
        dense += after.nbytes
        entry = {"n": name, "s": list(new[name].shape), "d": dtype_name(new[name]), "k": int(changed.size)}
        entries.append(entry | {"e": "sparse", "q": "raw", "ix": kind, "i": payload, "v": values})
    return entries if size * 2 <= dense else None


def _changes_fit(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> bool:
    """Whether the changed values alone (4 bytes each, indices not yet counted) could come to
    half of the dense size: counted tensor by tensor, without building any entry."""
    changed_bytes, dense = 0, 0
    for name, tensor in new.items():
        after, before = as_numpy(tensor), as_numpy(base[name])
        if after.shape != before.shape or after.dtype != before.dtype:
            return False
        dense += after.nbytes
        if tensor is base[name]:  # the same tensor: nothing to compare
            continue
        changed_bytes += int(np.count_nonzero(after.view(np.uint32) != before.view(np.uint32))) * after.itemsize
    return changed_bytes * 2 <= dense


def peek_global_header(data: bytes, limits: Limits) -> GlobalHeader:
    raw_header, _ = unpack_frame(data, limits, "global")
    return GlobalHeader.from_wire(raw_header)


def decode_global(data: bytes, limits: Limits, base: dict[str, torch.Tensor] | None = None) -> GlobalVersion:
    """Full weights from a dense frame, or ``base`` with a delta frame's changes applied."""
    raw_header, entries = unpack_frame(data, limits, "global")
    header = GlobalHeader.from_wire(raw_header)
    tensors = decode_tensors(entries, limits)
    if header.delta_from < 0:
        dense = {n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)}
        if len(dense) != len(tensors):
            raise SchemaError("a full global version carries dense weights only")
        return GlobalVersion(header, dense)
    if base is None:
        raise ValidationError(f"global {header.version} is a delta on {header.delta_from}, which is not held")
    if set(tensors) != set(base):
        raise ValidationError(f"global {header.version}: delta names do not match version {header.delta_from}")
    out = {}
    for name, change in tensors.items():
        if shape_of(change) != tuple(base[name].shape):
            raise ValidationError(f"global {header.version}: {name} shape differs from its base")
        rebuilt = base[name].to(torch.float32).clone()
        if isinstance(change, SparseTensor):
            rebuilt.view(-1)[change.indices] = change.values
        else:
            rebuilt.copy_(change)
        out[name] = rebuilt
    return GlobalVersion(header, out)
