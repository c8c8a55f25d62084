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

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedjet.errors import ConfigError
from fedjet.secagg import wire
from fedjet.secagg.errors import SecAggSchemaError
from fedjet.secagg.key_messages import Advertise, AdvertiseList, ShareDelivery, ShareKeys
from fedjet.secagg.unmask_messages import Confirm, Confirmations, MaskedInput, MaskedStatement, Reveal, UnmaskRequest

_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")

__all__ = [
    "MESSAGES",
    "Advertise",
    "AdvertiseList",
    "Confirm",
    "Confirmations",
    "MaskedInput",
    "MaskedStatement",
    "Reveal",
    "RoundConfig",
    "ShareDelivery",
    "ShareKeys",
    "Signed",
    "UnmaskRequest",
    "from_wire",
]


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
