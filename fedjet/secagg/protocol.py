"""Double masking (Bonawitz et al. 2017) as two pure state machines: a member and the server.

Neither does I/O: each method takes the message that arrived and returns the one to send, so
the integrator can carry them over any broker. A method checks the round id first (a message
from another round is a ``StaleRoundError``, never a phase error) and validates everything
before it changes state, so a rejected message (typed error) leaves the round where it was
and the right message can still arrive. ``SecAggAbort`` (below threshold) ends the round for
good; the next round is a new object with fresh keys and a new round id.

Threat model: the coordinator learns only the sum over survivors, as long as fewer than
``threshold`` members collude with it, even when it lies. Each member weighs its own input
(signed in its advertisement), signs the peers it masked against with its masked input, signs
one unmask request per round and reveals only for it, never both secrets of one member, and
only once it holds signatures on that request from ``threshold > n/2`` survivors and every
survivor's statement that it masked against exactly that request's members (the consistency
round of Bonawitz et al., checked with the member's own copy of everyone's key). So a
coordinator can get one request answered at all, and only one whose survivors all masked
against the same members: it learns the sum over those survivors, nothing about any one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from fedjet.errors import ConfigError
from fedjet.secagg import keys, shamir, wire
from fedjet.secagg.errors import EncodingError, RevealRefused, SecAggAbort, SecAggProtocolError, ShareError
from fedjet.secagg.keys import U64
from fedjet.secagg.messages import (
    Advertise,
    AdvertiseList,
    Confirm,
    Confirmations,
    MaskedInput,
    Reveal,
    RoundConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
)
from fedjet.secagg.transcript import Transcript
from fedjet.secagg.unmask import (
    check_advert_weight,
    check_consistency,
    check_masked,
    check_request,
    check_reveal,
    check_round,
    check_signature,
    recompute_sum,
)
from fedjet.secagg.weights import Weight


class Phase(enum.StrEnum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    RECEIVE_SHARES = "receive_shares"
    MASK = "mask"
    CONFIRM = "confirm"
    REVEAL = "reveal"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"


class _Machine:
    """Phase bookkeeping shared by both sides."""

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self._phase = Phase.ADVERTISE

    @property
    def phase(self) -> Phase:
        return self._phase

    def _expect(self, phase: Phase, action: str) -> None:
        if self._phase is not phase:
            raise SecAggProtocolError(f"cannot {action} in phase {self._phase} (round {self.config.round_id})")

    def _abort(self, stage: str, have: int) -> SecAggAbort:
        self._phase = Phase.ABORTED
        return SecAggAbort(stage, have, self.config.threshold)


class MemberRound(_Machine):
    """One member's side of one round: advertise, share keys, receive shares, mask, confirm, reveal.

    ``weight``: what this member computed itself (``fedjet.secagg.weights``); the input it masks
    must be encoded with ``weight.weight``."""

    def __init__(
        self,
        *,
        config: RoundConfig,
        member: str,
        signing_key: SigningKey,
        verify_keys: Mapping[str, VerifyKey],
        weight: Weight | None = None,
    ) -> None:
        if member not in config.members:
            raise ConfigError(f"{member!r:.40} is not in this round's roster")
        weight = weight or Weight(1, 1)
        if weight.weight < 1 or weight.units < 1:
            raise ConfigError(f"a member's weight and units must be >= 1, got {weight}")
        super().__init__(config)
        self.member = member
        self.weight = weight
        self._request: UnmaskRequest | None = None
        self._signing_key = signing_key
        self._verify_keys = dict(verify_keys)
        self._secrets = keys.RoundSecrets.generate()
        self._advert: Advertise | None = None
        self._peers: dict[str, Advertise] = {}  # U1, this member included
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (s_sk share, b share)
        self._u2: frozenset[str] = frozenset()

    def advertise(self) -> Advertise:
        """Round 0: fresh public keys and the commitment to b, signed with the long-term key."""
        self._expect(Phase.ADVERTISE, "advertise")
        cfg, s = self.config, self._secrets
        msg = Advertise(
            round_id=cfg.round_id,
            member=self.member,
            c_pk=keys.public_key(s.c_sk),
            s_pk=keys.public_key(s.s_sk),
            b_commit=keys.commit(s.b, job=cfg.job, round_id=cfg.round_id, member=self.member),
            weight=self.weight.weight,
            units=self.weight.units,
        )
        self._advert = replace(msg, sig=wire.sign(msg.signed_body(cfg.job), self._signing_key))
        self._phase = Phase.SHARE_KEYS
        return self._advert

    def _check_adverts(self, adverts: AdvertiseList) -> dict[str, Advertise]:
        peers: dict[str, Advertise] = {}
        for advert in adverts.adverts:
            check_round(advert, self.config)
            if advert.member not in self.config.members or advert.member in peers:
                raise SecAggProtocolError(f"advertisement of {advert.member!r:.40} is unknown or repeated")
            check_signature(advert, self.config, self._verify_keys)
            check_advert_weight(advert)
            peers[advert.member] = advert
        if peers.get(self.member) != self._advert:
            raise SecAggProtocolError("this member's own advertisement is missing or altered")
        return peers

    def share_keys(self, adverts: AdvertiseList) -> ShareKeys:
        """Round 1: Shamir-share s_sk and b to every advertiser, each share boxed to its recipient."""
        cfg, s = self.config, self._secrets
        check_round(adverts, cfg)
        self._expect(Phase.SHARE_KEYS, "share keys")
        peers = self._check_adverts(adverts)
        if len(peers) < cfg.threshold:
            raise self._abort("advertise", len(peers))
        ids = {m: cfg.index(m) for m in peers}
        s_shares = shamir.split(s.s_sk, cfg.threshold, ids.values())
        b_shares = shamir.split(s.b, cfg.threshold, ids.values())
        sealed = {
            v: keys.seal_share(
                keys.make_box(s.c_sk, peers[v].c_pk),
                job=cfg.job,
                round_id=cfg.round_id,
                sender=self.member,
                recipient=v,
                s=s_shares[ids[v]],
                b=b_shares[ids[v]],
            )
            for v in sorted(peers)
            if v != self.member
        }
        mine = ids[self.member]
        self._held = {self.member: (s_shares[mine], b_shares[mine])}
        self._peers = peers
        self._phase = Phase.RECEIVE_SHARES
        msg = ShareKeys(round_id=cfg.round_id, member=self.member, ciphertexts=sealed)
        return replace(msg, sig=wire.sign(msg.signed_body(cfg.job), self._signing_key))

    def receive_shares(self, delivery: ShareDelivery) -> None:
        """Open the shares addressed to this member; their senders (and itself) are U2."""
        cfg = self.config
        check_round(delivery, cfg, carries_shares=True)
        self._expect(Phase.RECEIVE_SHARES, "receive shares")
        senders = set(delivery.ciphertexts)
        if delivery.recipient != self.member or not senders <= set(self._peers) - {self.member}:
            raise SecAggProtocolError("share delivery is for another member or from non-advertisers")
        if len(senders) + 1 < cfg.threshold:
            raise self._abort("share keys", len(senders) + 1)
        opened = {
            u: keys.open_share(
                keys.make_box(self._secrets.c_sk, self._peers[u].c_pk),
                ct,
                job=cfg.job,
                round_id=cfg.round_id,
                sender=u,
                recipient=self.member,
            )
            for u, ct in delivery.ciphertexts.items()
        }
        own_x = cfg.index(self.member)
        if any(s.x != own_x or b.x != own_x for s, b in opened.values()):
            raise ShareError("a delivered share is addressed to another share id")
        self._held.update(opened)
        self._u2 = frozenset(senders | {self.member})
        self._phase = Phase.MASK

    def mask(self, x: U64) -> MaskedInput:
        """Round 2: y = x + PRG(b) + sum over U2 of +-PRG(s_uv), all mod 2^64; signed with U2."""
        self._expect(Phase.MASK, "mask")
        cfg, s = self.config, self._secrets
        if x.dtype != np.uint64 or x.shape != (cfg.numel,):
            raise EncodingError(f"masking needs a uint64 vector of {cfg.numel} elements, got {x.dtype} {x.shape}")
        y = x + keys.self_mask(s.b, cfg.numel, job=cfg.job, round_id=cfg.round_id, member=self.member)
        for v in sorted(self._u2 - {self.member}):
            mask = keys.pair_mask(
                s.s_sk, self._peers[v].s_pk, cfg.numel, job=cfg.job, round_id=cfg.round_id, u=self.member, v=v
            )
            if keys.sign_of(self.member, v) > 0:
                y += mask
            else:
                y -= mask
        self._phase = Phase.CONFIRM
        msg = MaskedInput(
            round_id=cfg.round_id, member=self.member, y=y.astype("<u8").tobytes(), peers=tuple(sorted(self._u2))
        )
        return replace(msg, sig=wire.sign(msg.signed_body(cfg.job), self._signing_key))

    def confirm(self, request: UnmaskRequest) -> Confirm:
        """Round 3: sign the one unmask request this member will ever answer in this round, once
        it names the members this member masked against, this member among the survivors."""
        cfg = self.config
        check_round(request, cfg)
        self._expect(Phase.CONFIRM, "confirm an unmask request")
        try:
            check_request(request, cfg)
        except RevealRefused:
            self._phase = Phase.FAILED
            raise
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self.member not in survivors or survivors | dropped != self._u2:
            raise SecAggProtocolError("unmask request does not partition the members this one masked against")
        if len(survivors) < cfg.threshold:
            raise self._abort("unmasking", len(survivors))
        self._request = request
        self._phase = Phase.REVEAL
        msg = Confirm(round_id=cfg.round_id, member=self.member, survivors=request.survivors, dropped=request.dropped)
        return replace(msg, sig=wire.sign(msg.signed_body(cfg.job), self._signing_key))

    def reveal(self, confirmations: Confirmations) -> Reveal:
        """Round 4: for the request this member signed, once T survivors signed it too and every
        survivor masked against its members: b shares of survivors, s_sk shares of the dropped."""
        cfg = self.config
        check_round(confirmations, cfg)
        self._expect(Phase.REVEAL, "reveal")
        request = self._request
        assert request is not None
        check_consistency(cfg, request, confirmations.confirms, confirmations.statements, self._verify_keys)
        survivors, dropped = set(request.survivors), set(request.dropped)
        msg = Reveal(
            round_id=cfg.round_id,
            member=self.member,
            b_shares={u: self._held[u][1].to_bytes() for u in sorted(survivors)},
            s_shares={v: self._held[v][0].to_bytes() for v in sorted(dropped)},
        )
        self._phase = Phase.DONE
        return replace(msg, sig=wire.sign(msg.signed_body(cfg.job), self._signing_key))


class ServerRound(_Machine):
    """The coordinator's side: collect, relay ciphertexts it cannot read, and unmask the sum."""

    def __init__(self, *, config: RoundConfig, verify_keys: Mapping[str, VerifyKey]) -> None:
        super().__init__(config)
        self._verify_keys = dict(verify_keys)
        self._adverts: dict[str, Advertise] = {}
        self._advert_list: AdvertiseList | None = None
        self._shares: dict[str, ShareKeys] = {}
        self._masked: dict[str, MaskedInput] = {}
        self._request: UnmaskRequest | None = None
        self._confirms: dict[str, Confirm] = {}
        self._reveals: dict[str, Reveal] = {}

    def receive_advert(self, msg: Advertise) -> None:
        check_round(msg, self.config)
        self._expect(Phase.ADVERTISE, "accept advertisements")
        if msg.member not in self.config.members or msg.member in self._adverts:
            raise SecAggProtocolError(f"advertisement of {msg.member!r:.40} is unknown or repeated")
        check_advert_weight(msg)
        check_signature(msg, self.config, self._verify_keys)
        self._adverts[msg.member] = msg

    def close_adverts(self) -> AdvertiseList:
        """End round 0; broadcast the returned list to every advertiser."""
        self._expect(Phase.ADVERTISE, "close advertisements")
        if len(self._adverts) < self.config.threshold:
            raise self._abort("advertise", len(self._adverts))
        adverts = tuple(self._adverts[m] for m in sorted(self._adverts))
        self._advert_list = AdvertiseList(round_id=self.config.round_id, adverts=adverts)
        self._phase = Phase.SHARE_KEYS
        return self._advert_list

    def receive_shares(self, msg: ShareKeys) -> None:
        check_round(msg, self.config, carries_shares=True)
        self._expect(Phase.SHARE_KEYS, "accept shares")
        if msg.member not in self._adverts:
            raise SecAggProtocolError(f"shares from {msg.member!r:.40}, which did not advertise")
        if msg.member in self._shares:
            raise ShareError(f"{msg.member!r:.40} sent its shares twice")
        if set(msg.ciphertexts) != set(self._adverts) - {msg.member}:
            raise SecAggProtocolError(f"shares of {msg.member!r:.40} are not addressed to every other advertiser")
        check_signature(msg, self.config, self._verify_keys)
        self._shares[msg.member] = msg

    def close_shares(self) -> dict[str, ShareDelivery]:
        """End round 1: one delivery per member of U2, holding what the others sealed to it."""
        self._expect(Phase.SHARE_KEYS, "close shares")
        u2 = sorted(self._shares)
        if len(u2) < self.config.threshold:
            raise self._abort("share keys", len(u2))
        self._phase = Phase.MASK
        return {
            v: ShareDelivery(
                round_id=self.config.round_id,
                recipient=v,
                ciphertexts={u: self._shares[u].ciphertexts[v] for u in u2 if u != v},
            )
            for v in u2
        }

    def receive_masked(self, msg: MaskedInput) -> None:
        check_round(msg, self.config)
        self._expect(Phase.MASK, "accept masked inputs")
        if msg.member not in self._shares or msg.member in self._masked:
            raise SecAggProtocolError(f"masked input of {msg.member!r:.40} is unexpected or repeated")
        check_masked(msg, self.config)
        if sorted(msg.peers) != sorted(self._shares):
            raise SecAggProtocolError(f"{msg.member!r:.40} masked against other members than shared keys")
        check_signature(msg, self.config, self._verify_keys)
        self._masked[msg.member] = msg

    def close_masked(self) -> UnmaskRequest:
        """End round 2: survivors are who sent a masked input; send the request to each of them."""
        self._expect(Phase.MASK, "close masked inputs")
        if len(self._masked) < self.config.threshold:
            raise self._abort("masked input", len(self._masked))
        survivors = tuple(sorted(self._masked))
        dropped = tuple(sorted(set(self._shares) - set(self._masked)))
        self._request = UnmaskRequest(round_id=self.config.round_id, survivors=survivors, dropped=dropped)
        self._phase = Phase.CONFIRM
        return self._request

    def receive_confirm(self, msg: Confirm) -> None:
        check_round(msg, self.config)
        self._expect(Phase.CONFIRM, "accept confirmations")
        assert self._request is not None
        if msg.member not in self._masked or msg.member in self._confirms:
            raise SecAggProtocolError(f"confirmation of {msg.member!r:.40} is unexpected or repeated")
        if (msg.survivors, msg.dropped) != (self._request.survivors, self._request.dropped):
            raise SecAggProtocolError(f"{msg.member!r:.40} signed another unmask request")
        check_signature(msg, self.config, self._verify_keys)
        self._confirms[msg.member] = msg

    def close_confirms(self) -> Confirmations:
        """End round 3: send the returned signatures and statements to every survivor that signed."""
        self._expect(Phase.CONFIRM, "close confirmations")
        if len(self._confirms) < self.config.threshold:
            raise self._abort("consistency check", len(self._confirms))
        self._phase = Phase.REVEAL
        return Confirmations(
            round_id=self.config.round_id,
            confirms=tuple(self._confirms[m] for m in sorted(self._confirms)),
            statements=tuple(self._masked[m].statement for m in sorted(self._masked)),
        )

    @property
    def confirmed(self) -> tuple[str, ...]:
        """The survivors that signed the unmask request: the only ones that may reveal."""
        return tuple(sorted(self._confirms))

    def receive_reveal(self, msg: Reveal) -> None:
        check_round(msg, self.config, carries_shares=True)
        self._expect(Phase.REVEAL, "accept reveals")
        assert self._request is not None
        if msg.member not in self._confirms:
            raise SecAggProtocolError(f"reveal from {msg.member!r:.40}, which did not sign the unmask request")
        if msg.member in self._reveals:
            raise ShareError(f"{msg.member!r:.40} revealed its shares twice")
        check_reveal(msg, self.config, self._request)
        check_signature(msg, self.config, self._verify_keys)
        self._reveals[msg.member] = msg

    @property
    def transcript(self) -> Transcript:
        """What was received so far (complete once ``finish`` ran): the input of ``recompute_sum``."""
        if self._advert_list is None or self._request is None:
            raise SecAggProtocolError("a transcript exists only once masked inputs are closed")
        return Transcript(
            config=self.config,
            adverts=self._advert_list,
            shares=tuple(self._shares[m] for m in sorted(self._shares)),
            masked=tuple(self._masked[m] for m in sorted(self._masked)),
            request=self._request,
            confirms=tuple(self._confirms[m] for m in sorted(self._confirms)),
            reveals=tuple(self._reveals[m] for m in sorted(self._reveals)),
        )

    def finish(self) -> U64:
        """End round 4: the sum of survivors' weighted inputs mod 2^64 (``unmask.average`` decodes it)."""
        self._expect(Phase.REVEAL, "unmask")
        if len(self._reveals) < self.config.threshold:
            raise self._abort("unmasking", len(self._reveals))
        try:
            total = recompute_sum(self.transcript)  # the same function replay runs
        except ShareError:
            self._phase = Phase.FAILED
            raise
        self._phase = Phase.DONE
        return total
