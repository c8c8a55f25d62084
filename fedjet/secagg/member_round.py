"""The member's side of a secure-aggregation round (double masking, Bonawitz et al. 2017): a
pure state machine, see :mod:`fedjet.secagg.protocol` for the threat model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from fedjet.errors import ConfigError
from fedjet.secagg import keys, shamir, wire
from fedjet.secagg.errors import EncodingError, RevealRefused, SecAggProtocolError, ShareError
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
from fedjet.secagg.round_machine import Phase, RoundMachine
from fedjet.secagg.unmask import (
    check_advert_weight,
    check_consistency,
    check_request,
    check_round,
    check_signature,
)
from fedjet.secagg.weights import Weight


class MemberRound(RoundMachine):
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
