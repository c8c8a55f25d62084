"""The messages of one secure-aggregation round, as frozen dataclasses with msgpack-ready wire maps.

Member -> coordinator messages are signed with the member's long-term Ed25519 key over a
canonical body that binds the job and round id, so a recorded transcript can be checked
again at replay. Coordinator -> member messages are not signed here: the integrator carries
them inside its own authenticated channel, and nothing in them can unmask anyone by itself.

Sequence per round (n members, threshold T)::

    member -> coordinator   Advertise      keys c_pk, s_pk and a commitment to b   (round 0)
    coordinator -> all      AdvertiseList  every advertisement received
    member -> coordinator   ShareKeys      encrypted Shamir shares, one per peer     (round 1)
    coordinator -> each     ShareDelivery  the ciphertexts addressed to it
    member -> coordinator   MaskedInput    y_u = x_u + masks  (mod 2^32)             (round 2)
    coordinator -> alive    UnmaskRequest  who survived, who dropped
    member -> coordinator   Reveal         b shares of survivors, s_sk shares of the dropped (round 3)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fedjet.errors import ConfigError
from fedjet.secagg import wire
from fedjet.secagg.errors import SecAggSchemaError

_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """What everyone agrees on before a round: roster (sorted), threshold and vector length."""

    KIND: ClassVar[str] = "sa.config"
    job: str
    round_id: int
    threshold: int
    members: tuple[str, ...]
    numel: int

    def __post_init__(self) -> None:
        n = len(self.members)
        if self.members != tuple(sorted(set(self.members))):
            raise ConfigError("secure-aggregation members must be sorted and distinct")
        if not all(_NAME.fullmatch(m) for m in (self.job, *self.members)):
            raise ConfigError("job and member names must match [A-Za-z0-9_.:/-]{1,128}")
        if not (2 <= self.threshold <= n and 2 * self.threshold > n):
            raise ConfigError(f"threshold must be in (n/2, n] and >= 2 for n={n} members, got {self.threshold}")
        if self.round_id < 0 or self.numel < 1 or n > wire.MAX_MEMBERS:
            raise ConfigError("round id must be >= 0, numel >= 1, and the roster bounded")

    def index(self, member: str) -> int:
        """The member's Shamir x-coordinate: 1 + its position in the roster."""
        return self.members.index(member) + 1

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "job": self.job,
            "round": self.round_id,
            "threshold": self.threshold,
            "members": list(self.members),
            "numel": self.numel,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> RoundConfig:
        m = wire.header(raw, cls.KIND)
        try:
            return cls(
                job=wire.get(m, "job", str),
                round_id=wire.get_count(m, "round"),
                threshold=wire.get_count(m, "threshold"),
                members=wire.get_names(m, "members"),
                numel=wire.get_count(m, "numel"),
            )
        except ConfigError as e:
            raise SecAggSchemaError(str(e)) from e


@dataclass(frozen=True, kw_only=True)
class Advertise:
    """Round 0: a member's fresh X25519 public keys and its commitment to the self-mask seed."""

    KIND: ClassVar[str] = "sa.advertise"
    round_id: int
    member: str
    c_pk: bytes  # share encryption (Box)
    s_pk: bytes  # pairwise mask agreement
    b_commit: bytes  # hash of the self-mask seed b
    sig: bytes = b""

    def signed_body(self, job: str) -> bytes:
        return wire.canonical(self.KIND, job, self.round_id, self.member, self.c_pk, self.s_pk, self.b_commit)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "c_pk": self.c_pk,
            "s_pk": self.s_pk,
            "b_commit": self.b_commit,
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Advertise:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            c_pk=wire.get_key(m, "c_pk"),
            s_pk=wire.get_key(m, "s_pk"),
            b_commit=wire.get_key(m, "b_commit"),
            sig=wire.get_key(m, "sig", wire.SIG_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class AdvertiseList:
    """Coordinator -> every advertiser: all advertisements it received (U1)."""

    KIND: ClassVar[str] = "sa.adverts"
    round_id: int
    adverts: tuple[Advertise, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "adverts": [a.to_wire() for a in self.adverts],
        }

    @classmethod
    def from_wire(cls, raw: Any) -> AdvertiseList:
        m = wire.header(raw, cls.KIND)
        adverts = wire.get_list(m, "adverts")
        if len(adverts) > wire.MAX_MEMBERS:
            raise SecAggSchemaError("too many advertisements")
        return cls(round_id=wire.get_count(m, "round"), adverts=tuple(Advertise.from_wire(a) for a in adverts))


@dataclass(frozen=True, kw_only=True)
class ShareKeys:
    """Round 1: the member's shares of ``s_sk`` and ``b``, one Box ciphertext per recipient."""

    KIND: ClassVar[str] = "sa.shares"
    round_id: int
    member: str
    ciphertexts: Mapping[str, bytes]  # recipient -> Box(c_sk_u, c_pk_v).encrypt(...)
    sig: bytes = b""

    def signed_body(self, job: str) -> bytes:
        return wire.canonical(self.KIND, job, self.round_id, self.member, wire.sorted_items(self.ciphertexts))

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "ct": dict(self.ciphertexts),
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> ShareKeys:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            ciphertexts=wire.get_blobs(m, "ct"),
            sig=wire.get_key(m, "sig", wire.SIG_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class ShareDelivery:
    """Coordinator -> one member of U2: the ciphertexts addressed to it, by sender."""

    KIND: ClassVar[str] = "sa.delivery"
    round_id: int
    recipient: str
    ciphertexts: Mapping[str, bytes]  # sender -> ciphertext

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "recipient": self.recipient,
            "ct": dict(self.ciphertexts),
        }

    @classmethod
    def from_wire(cls, raw: Any) -> ShareDelivery:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            recipient=wire.get(m, "recipient", str),
            ciphertexts=wire.get_blobs(m, "ct"),
        )


@dataclass(frozen=True, kw_only=True)
class MaskedInput:
    """Round 2: the masked vector, little-endian uint32; the signature covers its SHA-256."""

    KIND: ClassVar[str] = "sa.masked"
    round_id: int
    member: str
    y: bytes
    sig: bytes = b""

    @property
    def vector(self) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.y, dtype="<u4").astype(np.uint32, copy=False)

    def signed_body(self, job: str) -> bytes:
        digest = hashlib.sha256(self.y).digest()
        return wire.canonical(self.KIND, job, self.round_id, self.member, len(self.y), digest)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "y": self.y,
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> MaskedInput:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            y=wire.get(m, "y", bytes),
            sig=wire.get_key(m, "sig", wire.SIG_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest:
    """Coordinator -> survivors: who sent a masked input (U3) and who, of U2, did not."""

    KIND: ClassVar[str] = "sa.unmask"
    round_id: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_wire(cls, raw: Any) -> UnmaskRequest:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            survivors=wire.get_names(m, "survivors"),
            dropped=wire.get_names(m, "dropped"),
        )


@dataclass(frozen=True, kw_only=True)
class Reveal:
    """Round 3: shares of ``b`` for every survivor and of ``s_sk`` for every dropped member."""

    KIND: ClassVar[str] = "sa.reveal"
    round_id: int
    member: str
    b_shares: Mapping[str, bytes]  # survivor -> Share bytes
    s_shares: Mapping[str, bytes]  # dropped member -> Share bytes
    sig: bytes = b""

    def signed_body(self, job: str) -> bytes:
        return wire.canonical(
            self.KIND,
            job,
            self.round_id,
            self.member,
            wire.sorted_items(self.b_shares),
            wire.sorted_items(self.s_shares),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "b": dict(self.b_shares),
            "s": dict(self.s_shares),
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Reveal:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            b_shares=wire.get_blobs(m, "b"),
            s_shares=wire.get_blobs(m, "s"),
            sig=wire.get_key(m, "sig", wire.SIG_BYTES),
        )


Signed = Advertise | ShareKeys | MaskedInput | Reveal
MESSAGES: dict[str, Any] = {
    cls.KIND: cls
    for cls in (RoundConfig, Advertise, AdvertiseList, ShareKeys, ShareDelivery, MaskedInput, UnmaskRequest, Reveal)
}


def from_wire(raw: Any) -> Any:
    """Decode any secure-aggregation message by its ``kind``."""
    kind = raw.get("kind") if isinstance(raw, Mapping) else None
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SecAggSchemaError(f"unknown secure-aggregation message kind {kind!r:.40}")
    return cls.from_wire(raw)
