"""The messages of one secure-aggregation round, as frozen dataclasses with msgpack-ready wire maps.

Member -> coordinator messages are signed with the member's long-term Ed25519 key over a
canonical body that binds the job and round id, so a recorded transcript can be checked
again at replay. Coordinator -> member messages are not signed here: the integrator carries
them inside its own authenticated channel, and nothing in them can unmask anyone by itself.

Sequence per round (n members, threshold T)::

    member -> coordinator   Advertise      keys c_pk, s_pk, a commitment to b, its own weight (round 0)
    coordinator -> all      AdvertiseList  every advertisement received
    member -> coordinator   ShareKeys      encrypted Shamir shares, one per peer     (round 1)
    coordinator -> each     ShareDelivery  the ciphertexts addressed to it
    member -> coordinator   MaskedInput    y_u = w_u x_u + masks (mod 2^64), signed with the
                                           peers it masked against (its view of U2)  (round 2)
    coordinator -> alive    UnmaskRequest  who survived, who dropped
    member -> coordinator   Confirm        its signature on exactly that request     (round 3)
    coordinator -> signers  Confirmations  the signatures, and every survivor's signed masked statement
    member -> coordinator   Reveal         b shares of survivors, s_sk shares of the dropped (round 4)

Round 3 is the consistency check of Bonawitz et al.: a member reveals only for the one request it
signed, once it holds signatures on that same request from at least T of its survivors (so two
different requests cannot both be answered: each member signs one, and 2T > n) and every
survivor's signed statement that it masked against exactly the request's members (so a
coordinator that withheld shares from one member to shrink its peers learns nothing).
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
    weight: int = 1  # the member's own whole weight (fedjet.secagg.weights), signed here
    units: int = 1  # what it counts for in the denominator
    sig: bytes = b""

    def signed_body(self, job: str) -> bytes:
        return wire.canonical(
            self.KIND, job, self.round_id, self.member, self.c_pk, self.s_pk, self.b_commit, self.weight, self.units
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "c_pk": self.c_pk,
            "s_pk": self.s_pk,
            "b_commit": self.b_commit,
            "weight": self.weight,
            "units": self.units,
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
            weight=wire.get_count(m, "weight"),
            units=wire.get_count(m, "units"),
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
    """Round 2: the masked vector, little-endian uint64, and the members it masked against (its
    view of U2, itself included); the signature covers both (the vector by its SHA-256)."""

    KIND: ClassVar[str] = "sa.masked"
    round_id: int
    member: str
    y: bytes
    peers: tuple[str, ...] = ()
    sig: bytes = b""

    @property
    def vector(self) -> npt.NDArray[np.uint64]:
        return np.frombuffer(self.y, dtype="<u8").astype(np.uint64, copy=False)

    @property
    def statement(self) -> MaskedStatement:
        """What the other members check before revealing: the signed body without the vector."""
        return MaskedStatement(
            round_id=self.round_id, member=self.member, size=len(self.y), digest=hashlib.sha256(self.y).digest(),
            peers=self.peers, sig=self.sig,
        )  # fmt: skip

    def signed_body(self, job: str) -> bytes:
        return self.statement.signed_body(job)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "y": self.y,
            "peers": list(self.peers),
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> MaskedInput:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            y=wire.get(m, "y", bytes),
            peers=wire.get_names(m, "peers"),
            sig=wire.get_key(m, "sig", wire.SIG_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class MaskedStatement:
    """A masked input's signed body without the vector: who masked, against whom, and the hash."""

    KIND: ClassVar[str] = "sa.masked-statement"
    round_id: int
    member: str
    size: int
    digest: bytes
    peers: tuple[str, ...]
    sig: bytes = b""

    def signed_body(self, job: str) -> bytes:
        peers = sorted(self.peers)
        return wire.canonical(MaskedInput.KIND, job, self.round_id, self.member, self.size, self.digest, peers)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "size": self.size,
            "digest": self.digest,
            "peers": list(self.peers),
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> MaskedStatement:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            size=wire.get_count(m, "size"),
            digest=wire.get_key(m, "digest"),
            peers=wire.get_names(m, "peers"),
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
class Confirm:
    """Round 3: a survivor's signature on exactly the unmask request it was sent (one per round)."""

    KIND: ClassVar[str] = "sa.confirm"
    round_id: int
    member: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    sig: bytes = b""

    def signed_body(self, job: str) -> bytes:
        return wire.canonical(self.KIND, job, self.round_id, self.member, sorted(self.survivors), sorted(self.dropped))

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "member": self.member,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Confirm:
        m = wire.header(raw, cls.KIND)
        return cls(
            round_id=wire.get_count(m, "round"),
            member=wire.get(m, "member", str),
            survivors=wire.get_names(m, "survivors"),
            dropped=wire.get_names(m, "dropped"),
            sig=wire.get_key(m, "sig", wire.SIG_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class Confirmations:
    """Coordinator -> each survivor that confirmed: the signatures on the request, and every
    survivor's signed masked statement (which members it masked against)."""

    KIND: ClassVar[str] = "sa.confirmations"
    round_id: int
    confirms: tuple[Confirm, ...]
    statements: tuple[MaskedStatement, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "round": self.round_id,
            "confirms": [c.to_wire() for c in self.confirms],
            "statements": [s.to_wire() for s in self.statements],
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Confirmations:
        m = wire.header(raw, cls.KIND)
        confirms, statements = wire.get_list(m, "confirms"), wire.get_list(m, "statements")
        if len(confirms) > wire.MAX_MEMBERS or len(statements) > wire.MAX_MEMBERS:
            raise SecAggSchemaError("more confirmations or statements than members")
        return cls(
            round_id=wire.get_count(m, "round"),
            confirms=tuple(Confirm.from_wire(c) for c in confirms),
            statements=tuple(MaskedStatement.from_wire(s) for s in statements),
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


Signed = Advertise | ShareKeys | MaskedInput | MaskedStatement | Confirm | Reveal
MESSAGES: dict[str, Any] = {
    cls.KIND: cls
    for cls in (
        RoundConfig, Advertise, AdvertiseList, ShareKeys, ShareDelivery, MaskedInput, MaskedStatement,
        UnmaskRequest, Confirm, Confirmations, Reveal,
    )
}  # fmt: skip


def from_wire(raw: Any) -> Any:
    """Decode any secure-aggregation message by its ``kind``."""
    kind = raw.get("kind") if isinstance(raw, Mapping) else None
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SecAggSchemaError(f"unknown secure-aggregation message kind {kind!r:.40}")
    return cls.from_wire(raw)
