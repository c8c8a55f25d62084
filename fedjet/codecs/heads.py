"""The signed head of a global version and the blob references it carries.

A head says where a version's encrypted weights sit on the GLOBALS stream and, under a lossy
downlink, where the workers' view of it sits: both are a :class:`BlobRef`. Heads are signed and
recorded, and replay verifies the recorded bytes, so the wire layout below is fixed: the
header's fields flat, then the blob reference, the record, the chain link and the view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack  # type: ignore[import-untyped]

from fedjet.codecs import crypto
from fedjet.codecs.crypto import Identity, PublicIdentity
from fedjet.codecs.frame import field as read
from fedjet.errors import DecodeError, LimitError, SchemaError

MAX_HEAD_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True)
class GlobalHeader:
    """A global version: its identity (hash) and the coordinator's record of how it was made."""

    job: str
    version: int
    hash: str
    final: bool = False
    delta_from: int = -1  # >= 0: only changed values, to apply on top of that version

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> GlobalHeader:
        return cls(
            job=read(raw, "job", str),
            version=read(raw, "version", int),
            hash=read(raw, "hash", str),
            final=read(raw, "final", bool, default=False),
            delta_from=read(raw, "delta_from", int, default=-1),
        )


@dataclass(frozen=True, kw_only=True)
class BlobRef:
    """Where a sealed blob sits: its chunks' stream sequence range, its size and digest, its blob
    id (chunks in the range with another id are foreign) and its key sealed to each member."""

    first_seq: int
    last_seq: int
    size: int
    sha256: str
    blob_id: str = ""
    keys: dict[str, bytes] = field(default_factory=dict)
    seal: int = 1  # how the blob is sealed (fedjet.codecs.global_seal); 1 where the wire has none

    def blob_wire(self) -> dict[str, Any]:
        """The fields in their wire order (``seal`` only where it is not the first seal, so the
        heads of runs recorded before it read and verify as they were written)."""
        wire = {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "size": self.size,
            "sha256": self.sha256,
            "blob_id": self.blob_id,
            "keys": dict(self.keys),
        }
        return wire if self.seal == 1 else wire | {"seal": self.seal}


def _blob_from_wire(raw: dict[str, Any], keys: dict[str, bytes], *, optional: bool) -> dict[str, Any]:
    """A :class:`BlobRef`'s fields read from ``raw`` (``optional``: a view that may carry none)."""
    number, text = (0, "") if optional else (..., ...)
    return {
        "first_seq": read(raw, "first_seq", int, default=number),
        "last_seq": read(raw, "last_seq", int, default=number),
        "size": read(raw, "size", int, default=number),
        "sha256": read(raw, "sha256", str, default=text),
        "blob_id": read(raw, "blob_id", str, default=""),
        "keys": keys,
        "seal": read(raw, "seal", int, default=1),
    }


def _member_keys(raw: dict[str, Any], what: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = read(raw, "keys", dict, default={})
    if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in keys.items()):
        raise SchemaError(f"{what} keys must map member names to bytes")
    return keys


@dataclass(frozen=True, kw_only=True)
class ViewRef(BlobRef):
    """Where the workers' copy of a version sits under a lossy downlink (``+down``): the hash of
    the broadcast view, the version whose view it is a change on (-1: the view *is* this
    version's weights, nothing more to read), and that change's blob (none: the view did not
    change at this version)."""

    hash: str
    base: int = -1

    @classmethod
    def without_blob(cls, hash_: str, base: int = -1) -> ViewRef:
        """A view with nothing to read: a version's own weights, or the view of ``base`` unchanged."""
        return cls(hash=hash_, base=base, first_seq=0, last_seq=0, size=0, sha256="")

    def to_wire(self) -> dict[str, Any]:
        return {"hash": self.hash, "base": self.base, **self.blob_wire()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ViewRef:
        keys = _member_keys(raw, "view")
        hash_, base = read(raw, "hash", str), read(raw, "base", int, default=-1)
        return cls(hash=hash_, base=base, **_blob_from_wire(raw, keys, optional=True))


@dataclass(frozen=True, kw_only=True)
class GlobalHead(BlobRef):
    """The small signed message announcing a global version: its header (identity and hash),
    where its encrypted weights sit (the :class:`BlobRef` it is), and the version key sealed to
    each member. On the wire the header's fields sit flat beside the others."""

    header: GlobalHeader
    meta: bytes = b""  # the VersionRecord, encrypted with the version key
    prev_head_seq: int = 0  # stream sequence of the previous version's head (walk back to a snapshot)
    view: ViewRef | None = None  # the workers' lossy copy (a job with a +down codec)

    @property
    def job(self) -> str:
        return self.header.job

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def hash(self) -> str:
        return self.header.hash

    @property
    def final(self) -> bool:
        return self.header.final

    @property
    def delta_from(self) -> int:
        return self.header.delta_from

    def as_final(self) -> GlobalHead:
        """The same version re-announced as the last one (a job stopped early)."""
        return replace(self, header=replace(self.header, final=True))

    def to_wire(self) -> dict[str, Any]:
        body = {"hv": 1, **asdict(self.header), **self.blob_wire(), "meta": self.meta}
        body["prev_head_seq"] = self.prev_head_seq
        if self.view is not None:
            body["view"] = self.view.to_wire()
        return body

    def sign(self, coordinator: Identity) -> bytes:
        return crypto.sign(msgpack.packb(self.to_wire(), use_bin_type=True), coordinator)

    @classmethod
    def verify(cls, data: bytes, coordinator: PublicIdentity) -> GlobalHead:
        if len(data) > MAX_HEAD_BYTES:
            raise LimitError(f"global head of {len(data)} bytes > limit {MAX_HEAD_BYTES}")
        body = crypto.verify(data, coordinator)
        try:
            raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise DecodeError(f"global head is not msgpack: {e}"[:200]) from e
        if not isinstance(raw, dict) or raw.get("hv") != 1:
            raise SchemaError("global head has an unknown version")
        keys = _member_keys(raw, "global head")
        return cls(
            header=GlobalHeader.from_wire({**raw, "final": read(raw, "final", bool)}),
            **_blob_from_wire(raw, keys, optional=False),
            meta=read(raw, "meta", bytes, default=b""),
            prev_head_seq=read(raw, "prev_head_seq", int, default=0),
            view=ViewRef.from_wire(read(raw, "view", dict)) if raw.get("view") is not None else None,
        )
