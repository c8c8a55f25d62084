"""The two messages that cross the broker: a worker's update and a global version."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import torch

from fedjet.codecs.frame import Limits, pack_frame, unpack_frame
from fedjet.codecs.frame import field as read
from fedjet.codecs.pipeline import CodecSpec, decode_tensors, encode_tensors
from fedjet.errors import DecodeError, SchemaError

UPDATE_KINDS = ("delta", "gradient")


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

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise SchemaError(f"update kind must be one of {UPDATE_KINDS}, got {self.kind!r:.40}")
        if self.seq < 0 or self.base_version < 0 or self.samples < 0 or self.tokens < 0:
            raise SchemaError("seq, base_version, samples and tokens must be non-negative")
        if not math.isfinite(self.loss):
            raise SchemaError(f"reported loss must be finite, got {self.loss}")

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
        )


@dataclass(frozen=True)
class Update:
    header: UpdateHeader
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class GlobalHeader:
    """A global version: its identity (hash) and the coordinator's record of how it was made."""

    job: str
    version: int
    hash: str
    final: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> GlobalHeader:
        return cls(
            job=read(raw, "job", str),
            version=read(raw, "version", int),
            hash=read(raw, "hash", str),
            final=read(raw, "final", bool, default=False),
            meta=read(raw, "meta", dict, default={}),
        )


@dataclass(frozen=True)
class GlobalVersion:
    header: GlobalHeader
    tensors: dict[str, torch.Tensor]


def encode_update(update: Update, spec: CodecSpec) -> bytes:
    header = asdict(update.header) | {"codec": spec.text}
    return pack_frame("update", header, encode_tensors(update.tensors, spec))


def decode_update(data: bytes, limits: Limits) -> Update:
    raw_header, entries = unpack_frame(data, limits, "update")
    header = UpdateHeader.from_wire(raw_header)
    return Update(header, decode_tensors(entries, limits))


def encode_global(version: GlobalVersion) -> bytes:
    return pack_frame("global", asdict(version.header), encode_tensors(version.tensors, CodecSpec.dense()))


def decode_global(data: bytes, limits: Limits) -> GlobalVersion:
    raw_header, entries = unpack_frame(data, limits, "global")
    return GlobalVersion(GlobalHeader.from_wire(raw_header), decode_tensors(entries, limits))


@dataclass(frozen=True, kw_only=True)
class GlobalHead:
    """The small message announcing a global version: where its (chunked) weights sit."""

    job: str
    version: int
    hash: str
    final: bool
    first_seq: int
    last_seq: int
    size: int
    sha256: str

    def to_bytes(self) -> bytes:
        return msgpack.packb({"hv": 1, **asdict(self)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> GlobalHead:
        try:
            raw = msgpack.unpackb(
                data, raw=False, strict_map_key=True, max_bin_len=1 << 16, max_str_len=1 << 16
            )
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise DecodeError(f"global head is not msgpack: {e}"[:200]) from e
        if not isinstance(raw, dict) or raw.get("hv") != 1:
            raise SchemaError("global head has an unknown version")
        return cls(
            job=read(raw, "job", str),
            version=read(raw, "version", int),
            hash=read(raw, "hash", str),
            final=read(raw, "final", bool),
            first_seq=read(raw, "first_seq", int),
            last_seq=read(raw, "last_seq", int),
            size=read(raw, "size", int),
            sha256=read(raw, "sha256", str),
        )
