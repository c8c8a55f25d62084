"""The in-memory secure-aggregation round the protocol tests drive: a roster, its rounds, and each step."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from fedjet.secagg import (
    FixedPoint,
    MemberRound,
    RoundConfig,
    ServerRound,
    UnmaskRequest,
    Weight,
    from_wire,
)

FP = FixedPoint()


def hop(msg: Any) -> Any:
    """Through msgpack and back, as the broker would carry it."""
    return from_wire(msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False))


@dataclasses.dataclass
class Job:
    """Long-term identities of a roster; rounds are built fresh from it."""

    names: tuple[str, ...]
    signing: dict[str, SigningKey]

    @classmethod
    def of(cls, n: int) -> Job:
        names = tuple(f"cloud{i}" for i in range(n))
        return cls(names, {m: SigningKey.generate() for m in names})

    @property
    def verify(self) -> dict[str, VerifyKey]:
        return {m: k.verify_key for m, k in self.signing.items()}

    def round(
        self, threshold: int, numel: int, round_id: int = 1, weights: Mapping[str, Weight] | None = None
    ) -> tuple[ServerRound, dict[str, MemberRound]]:
        cfg = RoundConfig(job="job", round_id=round_id, threshold=threshold, members=self.names, numel=numel)
        members = {
            m: MemberRound(config=cfg, member=m, signing_key=self.signing[m], verify_keys=self.verify,
                           weight=(weights or {}).get(m))
            for m in self.names
        }  # fmt: skip
        return ServerRound(config=cfg, verify_keys=self.verify), members


def to_shares(server: ServerRound, members: Mapping[str, MemberRound], skip: Iterable[str] = ()) -> dict:
    """Rounds 0 and 1; returns the deliveries (members in ``skip`` stop after advertising)."""
    for m in members.values():
        server.receive_advert(hop(m.advertise()))
    adverts = hop(server.close_adverts())
    for name, m in members.items():
        keys = m.share_keys(adverts)
        if name not in skip:
            server.receive_shares(hop(keys))
    return server.close_shares()


def run(
    server: ServerRound,
    members: Mapping[str, MemberRound],
    inputs: Mapping[str, np.ndarray],
    *,
    skip_shares: Iterable[str] = (),
    skip_mask: Iterable[str] = (),
    skip_confirm: Iterable[str] = (),
    skip_reveal: Iterable[str] = (),
) -> np.ndarray:
    """A whole round; members in ``skip_*`` go silent at that step."""
    deliveries = to_shares(server, members, skip_shares)
    alive = [m for m in members if m in deliveries]
    for name in alive:
        members[name].receive_shares(hop(deliveries[name]))
        if name not in skip_mask:
            server.receive_masked(hop(members[name].mask(inputs[name])))
    request = hop(server.close_masked())
    confirm_and_reveal(server, members, request, skip_confirm=skip_confirm, skip_reveal=skip_reveal)
    return server.finish()


def confirm_and_reveal(
    server: ServerRound,
    members: Mapping[str, MemberRound],
    request: UnmaskRequest,
    *,
    skip_confirm: Iterable[str] = (),
    skip_reveal: Iterable[str] = (),
) -> None:
    """Rounds 3 and 4: the survivors sign the request, then reveal once they hold the signatures."""
    for name in request.survivors:
        if name not in skip_confirm:
            server.receive_confirm(hop(members[name].confirm(request)))
    confirmations = hop(server.close_confirms())
    for name in server.confirmed:
        if name not in skip_reveal:
            server.receive_reveal(hop(members[name].reveal(confirmations)))


def mask_all(
    server: ServerRound, members: Mapping[str, MemberRound], deliveries: Mapping[str, Any], inputs: Mapping[str, Any]
) -> UnmaskRequest:
    """Round 2 for every member: take its shares, send its masked input; the unmask request."""
    for name, m in members.items():
        m.receive_shares(deliveries[name])
        server.receive_masked(m.mask(inputs[name]))
    return server.close_masked()


def confirm_all(server: ServerRound, members: Mapping[str, MemberRound], request: UnmaskRequest) -> Any:
    """Round 3 for every member: each signs ``request``; the confirmations it gets back."""
    for m in members.values():
        server.receive_confirm(m.confirm(request))
    return server.close_confirms()


def encoded_inputs(names: Iterable[str], numel: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: FP.encode(rng.normal(0, 0.1, numel).astype(np.float32)) for m in names}


def ring_sum(vectors: Iterable[np.ndarray]) -> np.ndarray:
    items = list(vectors)
    total = np.zeros_like(items[0])
    for v in items:
        total += v
    return total
