"""Secure-aggregation messages of rounds 0 and 1: each member's fresh keys, then the Shamir
shares of its secrets, encrypted to each peer (:mod:`fedjet.secagg.messages` has the sequence)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedjet.secagg import wire
from fedjet.secagg.errors import SecAggSchemaError


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
