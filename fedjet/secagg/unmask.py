"""Removing the masks: a pure function of the transcript, run live and again at replay.

Sum over survivors U3 of ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} sign(u, v) PRG(s_uv)``:
pair masks between two survivors cancel, so what is left to subtract is ``PRG(b_u)`` for each
survivor (``b_u`` rebuilt from revealed shares) and ``sign(u, v) PRG(s_uv)`` for each survivor
``u`` and dropped ``v`` (``s_sk_v`` rebuilt from revealed shares). Every secret is rebuilt and
checked against its commitment before any mask is removed: a bad share yields nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
from nacl.signing import VerifyKey

from fedjet.secagg import keys, shamir, wire
from fedjet.secagg.errors import (
    SecAggAbort,
    SecAggAuthError,
    SecAggProtocolError,
    ShareError,
    StaleRoundError,
    StaleShareError,
)
from fedjet.secagg.keys import U32
from fedjet.secagg.messages import Advertise, MaskedInput, Reveal, RoundConfig, Signed, UnmaskRequest
from fedjet.secagg.transcript import Transcript


class _InRound(Protocol):
    @property
    def round_id(self) -> int: ...


def check_round(msg: _InRound, config: RoundConfig, *, carries_shares: bool = False) -> None:
    if msg.round_id != config.round_id:
        error = StaleShareError if carries_shares else StaleRoundError
        raise error(f"{type(msg).__name__} for round {msg.round_id}, this is round {config.round_id}")


def check_signature(msg: Signed, config: RoundConfig, verify_keys: Mapping[str, VerifyKey]) -> None:
    key = verify_keys.get(msg.member)
    if key is None:
        raise SecAggAuthError(f"no verify key for {msg.member!r:.40}")
    wire.verify(msg.signed_body(config.job), msg.sig, key, msg.member)


def check_masked(msg: MaskedInput, config: RoundConfig) -> None:
    if len(msg.y) != 4 * config.numel:
        raise SecAggProtocolError(f"masked input of {len(msg.y)} bytes, expected {4 * config.numel}")


def check_reveal(
    msg: Reveal, config: RoundConfig, request: UnmaskRequest
) -> tuple[dict[str, shamir.Share], dict[str, shamir.Share]]:
    """Parse a reveal: exactly the b shares of survivors and the s_sk shares of the dropped."""
    check_round(msg, config, carries_shares=True)
    if set(msg.b_shares) != set(request.survivors) or set(msg.s_shares) != set(request.dropped):
        raise SecAggProtocolError(f"reveal of {msg.member!r:.40} does not answer the unmask request")
    own_x = config.index(msg.member)
    parsed = []
    for shares in (msg.b_shares, msg.s_shares):
        points = {owner: shamir.Share.from_bytes(data) for owner, data in shares.items()}
        if any(p.x != own_x for p in points.values()):
            raise ShareError(f"{msg.member!r:.40} revealed a share that is not its own")
        parsed.append(points)
    return parsed[0], parsed[1]


def _rebuild(
    config: RoundConfig,
    adverts: Mapping[str, Advertise],
    request: UnmaskRequest,
    parsed: list[tuple[dict[str, shamir.Share], dict[str, shamir.Share]]],
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Every survivor's b and every dropped member's s_sk, each checked against its commitment."""
    t, job, rnd = config.threshold, config.job, config.round_id
    seeds, secrets = {}, {}
    for u in request.survivors:
        b = shamir.combine([p[0][u] for p in parsed], t)
        if keys.commit(b, job=job, round_id=rnd, member=u) != adverts[u].b_commit:
            raise ShareError(f"rebuilt self-mask seed of {u!r:.40} does not match its commitment")
        seeds[u] = b
    for v in request.dropped:
        s_sk = shamir.combine([p[1][v] for p in parsed], t)
        if keys.public_key(s_sk) != adverts[v].s_pk:
            raise ShareError(f"rebuilt mask key of {v!r:.40} does not match its public key")
        secrets[v] = s_sk
    return seeds, secrets


def _check_structure(t: Transcript) -> dict[str, Advertise]:
    """The transcript is one consistent round: who advertised, shared, masked and revealed."""
    cfg, req = t.config, t.request
    adverts = {a.member: a for a in t.adverts.adverts}
    if len(adverts) != len(t.adverts.adverts) or not set(adverts) <= set(cfg.members):
        raise SecAggProtocolError("advertisements repeat a member or name one outside the roster")
    u2 = [s.member for s in t.shares]
    u3 = [m.member for m in t.masked]
    if len(set(u2)) != len(u2) or not set(u2) <= set(adverts):
        raise SecAggProtocolError("share messages repeat a member or come from one that did not advertise")
    if len(set(u3)) != len(u3) or set(u3) != set(req.survivors) or set(req.survivors) & set(req.dropped):
        raise SecAggProtocolError("the unmask request does not match who sent masked inputs")
    if set(req.survivors) | set(req.dropped) != set(u2):
        raise SecAggProtocolError("survivors and dropped members do not partition who shared keys")
    plain: list[_InRound] = [t.adverts, *t.adverts.adverts, *t.masked, req]
    for msg in plain:
        check_round(msg, cfg)
    for msg in t.shares:
        check_round(msg, cfg, carries_shares=True)
    return adverts


def recompute_sum(t: Transcript, verify_keys: Mapping[str, VerifyKey] | None = None) -> U32:
    """Sum of the survivors' encoded inputs mod 2^32; with ``verify_keys``, every signature too."""
    cfg, req = t.config, t.request
    adverts = _check_structure(t)
    if verify_keys is not None:
        signed: list[Signed] = [*t.adverts.adverts, *t.shares, *t.masked, *t.reveals]
        for msg in signed:
            check_signature(msg, cfg, verify_keys)
    if len(req.survivors) < cfg.threshold:
        raise SecAggAbort("masked input", len(req.survivors), cfg.threshold)
    revealers = [r.member for r in t.reveals]
    if len(set(revealers)) != len(revealers) or not set(revealers) <= set(req.survivors):
        raise ShareError("reveals repeat a member or come from one that is not a survivor")
    if len(revealers) < cfg.threshold:
        raise SecAggAbort("unmasking", len(revealers), cfg.threshold)
    parsed = [check_reveal(r, cfg, req) for r in t.reveals]
    seeds, secrets = _rebuild(cfg, adverts, req, parsed)
    n = cfg.numel
    total = np.zeros(n, dtype=np.uint32)
    for msg in t.masked:
        check_masked(msg, cfg)
        total += msg.vector
    for u, b in seeds.items():
        total -= keys.self_mask(b, n, job=cfg.job, round_id=cfg.round_id, member=u)
    for v, s_sk in secrets.items():
        for u in req.survivors:
            mask = keys.pair_mask(s_sk, adverts[u].s_pk, n, job=cfg.job, round_id=cfg.round_id, u=u, v=v)
            if keys.sign_of(u, v) > 0:
                total -= mask
            else:
                total += mask
    return total
