"""The server's side of a secure-aggregation round (double masking, Bonawitz et al. 2017): a
pure state machine, see :mod:`fedjet.secagg.protocol` for the threat model."""

from __future__ import annotations

from collections.abc import Mapping

from nacl.signing import VerifyKey

from fedjet.secagg.errors import SecAggProtocolError, ShareError
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
from fedjet.secagg.transcript import Transcript
from fedjet.secagg.unmask import (
    check_advert_weight,
    check_masked,
    check_reveal,
    check_round,
    check_signature,
    recompute_sum,
)


class ServerRound(RoundMachine):
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
