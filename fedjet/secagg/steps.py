"""How a secure round travels through the broker: one typed ``Step`` per message.

The protocol messages (:mod:`fedjet.secagg.messages`) say nothing about which global version
a round belongs to or how the coordinator opens it; a ``Step`` wraps one of them with that:
its ``kind``, the round id, the base version, and a small ``extra`` map (the roster when a
round opens, a member's update header with its advertisement). Nothing the coordinator puts
in ``extra`` changes what a member contributes: members weigh themselves
(``fedjet.secagg.weights``). Steps travel sealed to their one recipient
(``fedjet.codecs.crypto``), so the broker reads none of it; here they are only packed and
checked. Pure: no I/O.

Round ids are ``base_version * ATTEMPTS + attempt``: unique per job, so a message of an
earlier attempt (or version) is never taken for one of the current round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np

from fedjet.secagg.coords import Indices, random_k_indices
from fedjet.secagg.errors import SecAggSchemaError

STEP_VERSION = 1
ATTEMPTS = 1 << 16  # round ids per base version
UP = ("advertise", "shares", "masked", "confirm", "reveal")  # member -> coordinator
DOWN = ("open", "adverts", "deliver", "unmask", "confirmed", "abort")  # coordinator -> member
MAX_EXTRA_KEYS = 64


def round_id(base_version: int, attempt: int) -> int:
    return base_version * ATTEMPTS + attempt


@dataclass(frozen=True, kw_only=True)
class Step:
    kind: str
    round_id: int
    base_version: int
    body: Mapping[str, Any] = field(default_factory=dict)  # the protocol message's wire map
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in UP + DOWN:
            raise SecAggSchemaError(f"unknown secure-aggregation step {self.kind!r:.40}")
        if not (self.round_id >= 0 and self.base_version >= 0 and self.round_id // ATTEMPTS == self.base_version):
            raise SecAggSchemaError(f"round {self.round_id} does not belong to base version {self.base_version}")
        if len(self.extra) > MAX_EXTRA_KEYS:
            raise SecAggSchemaError("a step carries too many extra fields")

    def to_bytes(self) -> bytes:
        data: bytes = msgpack.packb(
            {
                "v": STEP_VERSION,
                "kind": self.kind,
                "round": self.round_id,
                "base": self.base_version,
                "body": dict(self.body),
                "extra": dict(self.extra),
            },
            use_bin_type=True,
        )
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Step:
        """Read an authenticated step; anything malformed is a ``SecAggSchemaError``."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data), max_str_len=1 << 16)
        except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
            raise SecAggSchemaError(f"secure-aggregation step is not msgpack: {type(e).__name__}") from e
        if not isinstance(raw, dict) or raw.get("v") != STEP_VERSION:
            raise SecAggSchemaError("not a secure-aggregation step of a version this build reads")
        kind, rid, base = raw.get("kind"), raw.get("round"), raw.get("base")
        body, extra = raw.get("body"), raw.get("extra")
        if not isinstance(kind, str) or not isinstance(rid, int) or not isinstance(base, int):
            raise SecAggSchemaError("a step needs a kind, a round id and a base version")
        if isinstance(rid, bool) or isinstance(base, bool):
            raise SecAggSchemaError("a round id and a base version are whole numbers")
        if not isinstance(body, dict) or not isinstance(extra, dict):
            raise SecAggSchemaError("a step's body and extra must be maps")
        return cls(kind=kind, round_id=rid, base_version=base, body=body, extra=extra)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_open(step: Step) -> tuple[tuple[str, ...], int, int]:
    """(roster, threshold, masked length) of an ``open`` step."""
    members, threshold, numel = (step.extra.get(k) for k in ("members", "threshold", "numel"))
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise SecAggSchemaError("an open step must list the roster")
    if not _whole(threshold) or not _whole(numel):
        raise SecAggSchemaError("an open step needs a whole threshold and vector length")
    assert isinstance(threshold, int) and isinstance(numel, int)
    return tuple(members), threshold, numel


def agreed_indices(job: str, base_hash: str, numel: int, k: int) -> Indices:
    """The coordinates every member masks this round: random, the same for all, and fixed
    only once the base version (whose hash is signed in its head) exists."""
    if k >= numel:
        return np.arange(numel, dtype=np.int64)
    seed = hashlib.sha256(f"fedjet-secagg-indices/{job}/{base_hash}".encode()).digest()
    return random_k_indices(seed, numel, k)
