"""Secure-aggregation messages of rounds 2 to 4: the masked inputs, then the consistency check
and the reveals that unmask their sum (:mod:`fedjet.secagg.messages` has the sequence)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fedjet.secagg import wire
from fedjet.secagg.errors import SecAggSchemaError


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
