"""What the coordinator received in one round: enough to recompute the sum at replay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedjet.secagg import wire
from fedjet.secagg.errors import SecAggSchemaError
from fedjet.secagg.messages import (
    AdvertiseList,
    Confirm,
    MaskedInput,
    Reveal,
    RoundConfig,
    ShareKeys,
    UnmaskRequest,
)


@dataclass(frozen=True, kw_only=True)
class Transcript:
    """Every member message the coordinator accepted in a completed round, plus what it sent."""

    KIND: ClassVar[str] = "sa.transcript"
    config: RoundConfig
    adverts: AdvertiseList
    shares: tuple[ShareKeys, ...]
    masked: tuple[MaskedInput, ...]
    request: UnmaskRequest
    confirms: tuple[Confirm, ...]
    reveals: tuple[Reveal, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": wire.SECAGG_VERSION,
            "kind": self.KIND,
            "config": self.config.to_wire(),
            "adverts": self.adverts.to_wire(),
            "shares": [s.to_wire() for s in self.shares],
            "masked": [m.to_wire() for m in self.masked],
            "request": self.request.to_wire(),
            "confirms": [c.to_wire() for c in self.confirms],
            "reveals": [r.to_wire() for r in self.reveals],
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Transcript:
        m = wire.header(raw, cls.KIND)
        lists = {key: wire.get_list(m, key) for key in ("shares", "masked", "confirms", "reveals")}
        if any(len(v) > wire.MAX_MEMBERS for v in lists.values()):
            raise SecAggSchemaError("a transcript lists more messages than members")
        return cls(
            config=RoundConfig.from_wire(wire.get(m, "config", dict)),
            adverts=AdvertiseList.from_wire(wire.get(m, "adverts", dict)),
            shares=tuple(ShareKeys.from_wire(s) for s in lists["shares"]),
            masked=tuple(MaskedInput.from_wire(s) for s in lists["masked"]),
            request=UnmaskRequest.from_wire(wire.get(m, "request", dict)),
            confirms=tuple(Confirm.from_wire(s) for s in lists["confirms"]),
            reveals=tuple(Reveal.from_wire(s) for s in lists["reveals"]),
        )
