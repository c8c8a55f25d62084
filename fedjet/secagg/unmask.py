"""Removing the masks: a pure function of the transcript, run live and again at replay.

Sum over survivors U3 of ``y_u = w_u x_u + PRG(b_u) + sum_{v in U2, v != u} sign(u, v) PRG(s_uv)``:
pair masks between two survivors cancel, so what is left to subtract is ``PRG(b_u)`` for each
survivor (``b_u`` rebuilt from revealed shares) and ``sign(u, v) PRG(s_uv)`` for each survivor
``u`` and dropped ``v`` (``s_sk_v`` rebuilt from revealed shares). Every secret is rebuilt and
checked against its commitment before any mask is removed: a bad share yields nothing.

The same checks a member makes before it reveals are made here too (``check_consistency``):
every survivor signed that it masked against exactly the request's members, and at least T
survivors signed the request itself; ``average`` divides by the survivors' own signed units and
refuses a sum that clipped inputs of their weights cannot make.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np
from nacl.signing import VerifyKey

from fedjet.secagg import keys, shamir, wire
from fedjet.secagg.errors import (
    RevealRefused,
    SecAggAbort,
    SecAggAuthError,
    SecAggError,
    SecAggProtocolError,
    ShareError,
    StaleRoundError,
    StaleShareError,
)
from fedjet.secagg.fixedpoint import F32, RING_BYTES, FixedPoint
from fedjet.secagg.keys import U64
from fedjet.secagg.messages import (
    Advertise,
    Confirm,
    MaskedInput,
    MaskedStatement,
    Reveal,
    RoundConfig,
    Signed,
    UnmaskRequest,
)
from fedjet.secagg.transcript import Transcript
from fedjet.secagg.weights import Weight


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
    if len(msg.y) != RING_BYTES * config.numel:
        raise SecAggProtocolError(f"masked input of {len(msg.y)} bytes, expected {RING_BYTES * config.numel}")


def check_advert_weight(msg: Advertise) -> Weight:
    if msg.weight < 1 or msg.units < 1:
        raise SecAggProtocolError(f"advertisement of {msg.member!r:.40} has weight {msg.weight}, units {msg.units}")
    return Weight(msg.weight, msg.units)


def check_request(request: UnmaskRequest, config: RoundConfig) -> None:
    """A request names distinct members, none of them both a survivor and dropped."""
    survivors, dropped = set(request.survivors), set(request.dropped)
    if survivors & dropped:
        raise RevealRefused(f"asked for both secrets of {sorted(survivors & dropped)[:3]}: refusing this round")
    if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
        raise SecAggProtocolError("unmask request repeats a member")
    if not (survivors | dropped) <= set(config.members):
        raise SecAggProtocolError("unmask request names members outside the roster")


def check_consistency(
    config: RoundConfig,
    request: UnmaskRequest,
    confirms: Iterable[Confirm],
    statements: Iterable[MaskedStatement],
    verify_keys: Mapping[str, VerifyKey] | None,
) -> set[str]:
    """Who signed ``request`` (at least T distinct survivors, or ``RevealRefused``), once every
    survivor's signed statement says it masked against exactly the request's members.

    With ``verify_keys`` (a member's own copy of every cloud's key) every signature is checked;
    without (the coordinator's transcript check) only the structure is."""
    members = sorted(set(request.survivors) | set(request.dropped))
    wanted = (sorted(request.survivors), sorted(request.dropped))
    by_member: dict[str, MaskedStatement] = {}
    for st in statements:
        if st.member in request.survivors and st.member not in by_member and st.round_id == config.round_id:
            if verify_keys is not None:
                try:
                    check_signature(st, config, verify_keys)
                except SecAggAuthError:
                    continue
            by_member[st.member] = st
    missing = [s for s in request.survivors if s not in by_member]
    if missing:
        raise RevealRefused(f"no signed masked statement of survivor(s) {missing[:3]}: refusing to reveal")
    split = [s for s, st in by_member.items() if sorted(st.peers) != members]
    if split:
        raise RevealRefused(
            f"survivor(s) {split[:3]} masked against other members than this request names "
            "(shares withheld to isolate them?): refusing to reveal"
        )
    signers: set[str] = set()
    for c in confirms:
        if c.member not in request.survivors or c.member in signers or c.round_id != config.round_id:
            continue
        if (sorted(c.survivors), sorted(c.dropped)) != wanted:
            continue
        if verify_keys is not None:
            try:
                check_signature(c, config, verify_keys)
            except SecAggAuthError:
                continue
        signers.add(c.member)
    if len(signers) < config.threshold:
        raise RevealRefused(
            f"only {len(signers)} survivor(s) signed this unmask request, fewer than the threshold "
            f"{config.threshold} (the coordinator may be telling members different stories): refusing to reveal"
        )
    return signers


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
    """The transcript is one consistent round: who advertised, shared, masked, confirmed and revealed."""
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
    plain: list[_InRound] = [t.adverts, *t.adverts.adverts, *t.masked, req, *t.confirms]
    for msg in plain:
        check_round(msg, cfg)
    for msg in t.shares:
        check_round(msg, cfg, carries_shares=True)
    for a in adverts.values():
        check_advert_weight(a)
    return adverts


def recompute_sum(t: Transcript, verify_keys: Mapping[str, VerifyKey] | None = None) -> U64:
    """Sum of the survivors' encoded inputs mod 2^64; with ``verify_keys``, every signature too."""
    cfg, req = t.config, t.request
    adverts = _check_structure(t)
    if verify_keys is not None:
        signed: list[Signed] = [*t.adverts.adverts, *t.shares, *t.masked, *t.confirms, *t.reveals]
        for msg in signed:
            check_signature(msg, cfg, verify_keys)
    if len(req.survivors) < cfg.threshold:
        raise SecAggAbort("masked input", len(req.survivors), cfg.threshold)
    try:
        signers = check_consistency(cfg, req, t.confirms, [m.statement for m in t.masked], None)
    except RevealRefused as e:
        raise SecAggProtocolError(f"the transcript fails the consistency check: {e}") from e
    revealers = [r.member for r in t.reveals]
    if len(set(revealers)) != len(revealers) or not set(revealers) <= signers:
        raise ShareError("reveals repeat a member or come from one that did not sign the unmask request")
    if len(revealers) < cfg.threshold:
        raise SecAggAbort("unmasking", len(revealers), cfg.threshold)
    parsed = [check_reveal(r, cfg, req) for r in t.reveals]
    seeds, secrets = _rebuild(cfg, adverts, req, parsed)
    n = cfg.numel
    total = np.zeros(n, dtype=np.uint64)
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


def survivor_weights(t: Transcript) -> dict[str, Weight]:
    """Each survivor's own signed weight and units, from its advertisement."""
    adverts = {a.member: a for a in t.adverts.adverts}
    try:
        return {m: check_advert_weight(adverts[m]) for m in t.request.survivors}
    except KeyError as e:
        raise SecAggProtocolError(f"survivor {e} did not advertise") from e


def average(t: Transcript, total: U64, fixed_point: FixedPoint) -> F32:
    """The survivors' weighted average: ``total`` over their units, refused if out of range."""
    weights = survivor_weights(t)
    if not weights:
        raise SecAggError("a round without survivors has no average")
    weight_total = sum(w.weight for w in weights.values())
    unit_total = sum(w.units for w in weights.values())
    return fixed_point.decode(total, weight_total=weight_total, unit_total=unit_total)
