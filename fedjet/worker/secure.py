"""A worker's side of secure aggregation: its update goes out only masked.

After training on a base version the worker waits for the coordinator to open a round on
that base, then runs the member state machine over the broker: advertise (with its update
header: samples, losses, a number each, never text, and the weight it computed itself from
that header and the job's rule), share keys, mask its update times its own weight, sign the
unmask request it was sent, and reveal what the survivors need only once enough survivors
signed the same request (``MemberRound.reveal`` checks, with this member's own keys). Nothing
the coordinator sends can change the weight. A round that aborts, or a phase that
times out, is retried on the next round the coordinator opens on the same base; a newer
global version ends the wait (this update missed its round, as a late one would).

With ``density < 1`` only the agreed random coordinates are masked; the rest stays in a
residual that is added to the next update (error feedback), so nothing is lost for good.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey, VerifyKey

from fedjet.channel.secagg import SecAggLink
from fedjet.codecs.crypto import COORDINATOR
from fedjet.codecs.flat import flatten
from fedjet.codecs.messages import UpdateHeader
from fedjet.config.job import StrategyConfig
from fedjet.config.secure_agg import SecureAggConfig
from fedjet.config.wire import to_wire
from fedjet.errors import FedjetError
from fedjet.log import get_logger
from fedjet.secagg import AdvertiseList, Confirmations, MemberRound, RoundConfig, ShareDelivery, UnmaskRequest
from fedjet.secagg.errors import SecAggProtocolError
from fedjet.secagg.fixedpoint import FixedPoint
from fedjet.secagg.steps import Step, agreed_indices, read_open
from fedjet.secagg.weights import WeightRule
from fedjet.weights import Weights

log = get_logger("fedjet.worker")
POLL_S = 0.5


class SecureMember:
    def __init__(
        self,
        link: SecAggLink,
        *,
        job: str,
        cloud: str,
        clouds: tuple[str, ...],
        config: SecureAggConfig,
        signing_key: SigningKey,
        verify_keys: Mapping[str, VerifyKey],
        staleness: Callable[[int], float] | None = None,
        max_staleness: int | None = None,
    ) -> None:
        """``verify_keys``: every cloud's long-term key, from the member's own key directory
        (not from the coordinator, which could otherwise pose as members). ``staleness`` and
        ``max_staleness``: FedBuff's s(tau) and bound from the job spec (the defaults when not
        given), for weighing an update made on an older version."""
        self.link = link
        self.job = job
        self.cloud = cloud
        self.members = tuple(sorted(clouds))
        self.config = config
        self.min_threshold = config.threshold_for(len(clouds))
        self.signing_key = signing_key
        self.verify_keys = dict(verify_keys)
        max_weight = FixedPoint.for_job(config).max_weight(len(clouds))
        self.by_samples = WeightRule(max_weight=max_weight)
        if staleness is None or max_staleness is None:
            defaults = StrategyConfig()
            staleness = defaults.staleness if staleness is None else staleness
            max_staleness = defaults.max_staleness if max_staleness is None else max_staleness
        self.by_staleness = WeightRule(max_weight=max_weight, staleness=staleness, max_staleness=max_staleness)
        self._residual: npt.NDArray[np.float32] | None = None
        self._reopened: Step | None = None  # an open that arrived while a round was under way
        self.rounds_done = 0
        self.rounds_failed = 0

    async def contribute(
        self,
        update: Weights,
        header: UpdateHeader,
        base_hash: str,
        too_late: Callable[[], bool],
        *,
        later_rounds: bool = False,
    ) -> bool:
        """Run rounds until one completes (True) or ``too_late()`` says this update is (False).

        Synchronous rules take only rounds on ``header.base_version`` (whose hash this member
        verified itself); FedBuff (``later_rounds``) joins any round on that base or a later one,
        with the coordinator weighing its staleness."""
        x = flatten(update)
        if self._residual is not None and self._residual.shape == x.shape:
            x = x + self._residual
        k = self.config.numel_masked(x.size)
        while not too_late():
            opened, self._reopened = self._reopened, None
            if opened is None or not self._takes(opened, header.base_version, later_rounds):
                opened = await self._next("open", header.base_version, None, too_late, later_rounds)
            if opened is None:
                continue
            round_hash = opened.extra.get("base_hash")
            if not later_rounds and round_hash != base_hash:
                log.warning("secagg_round_refused", round=opened.round_id, why="not the verified base hash")
                continue
            if not isinstance(round_hash, str):
                continue
            indices = agreed_indices(self.job, round_hash, x.size, k)
            rule = self.by_staleness if later_rounds else self.by_samples
            try:
                done = await self._round(opened, x[indices], header, too_late, rule)
            except FedjetError as e:
                log.warning("secagg_round_failed", round=opened.round_id, reason=e.reason, detail=str(e)[:200])
                done = False
            if done:
                rest = x.copy()
                rest[indices] = 0.0
                self._residual = rest if k < x.size else None
                self.rounds_done += 1
                return True
            self.rounds_failed += 1
        return False

    @staticmethod
    def _takes(step: Step, base: int, later_rounds: bool) -> bool:
        return step.kind == "open" and (step.base_version == base or (later_rounds and step.base_version > base))

    async def _round(
        self,
        opened: Step,
        x: npt.NDArray[np.float32],
        header: UpdateHeader,
        newer: Callable[[], bool],
        rule: WeightRule | None = None,
    ) -> bool:
        members, threshold, numel = read_open(opened)
        if members != self.members or threshold < self.min_threshold or numel != x.size:
            raise SecAggProtocolError(
                f"round {opened.round_id} opened with roster {members}, threshold {threshold}, {numel} coordinates: "
                f"this job agreed on {self.members}, at least {self.min_threshold}, {x.size}"
            )
        # this member's own weight: its own sample count, or the staleness of the version it
        # trained on against the round's base (whose id the round id and the signed steps bind)
        weight = (rule or self.by_samples).of(samples=header.samples, tau=opened.base_version - header.base_version)
        rc = RoundConfig(job=self.job, round_id=opened.round_id, threshold=threshold, members=members, numel=numel)
        member = MemberRound(
            config=rc, member=self.cloud, signing_key=self.signing_key, verify_keys=self.verify_keys, weight=weight
        )
        base, rid = opened.base_version, opened.round_id

        def step(kind: str, body: dict[str, object], **extra: object) -> Step:
            return Step(kind=kind, round_id=rid, base_version=base, body=body, extra=extra)

        await self.link.send(COORDINATOR, step("advertise", member.advertise().to_wire(), header=to_wire(header)))
        adverts = await self._next("adverts", base, rid, newer)
        if adverts is None:
            return False
        await self.link.send(
            COORDINATOR, step("shares", member.share_keys(AdvertiseList.from_wire(adverts.body)).to_wire())
        )
        delivery = await self._next("deliver", base, rid, newer)
        if delivery is None:
            return False
        member.receive_shares(ShareDelivery.from_wire(delivery.body))
        encoded = FixedPoint.for_job(self.config).encode(x, weight=weight.weight)
        await self.link.send(COORDINATOR, step("masked", member.mask(encoded).to_wire()))
        request = await self._next("unmask", base, rid, newer)
        if request is None:
            return False
        confirm = member.confirm(UnmaskRequest.from_wire(request.body))
        await self.link.send(COORDINATOR, step("confirm", confirm.to_wire()))
        confirmed = await self._next("confirmed", base, rid, newer)
        if confirmed is None:
            return False
        reveal = member.reveal(Confirmations.from_wire(confirmed.body))
        await self.link.send(COORDINATOR, step("reveal", reveal.to_wire()))
        log.info("secagg_masked_update_sent", round=rid, weight=weight.weight, units=weight.units, coordinates=numel)
        return True

    async def _next(
        self, kind: str, base: int, rid: int | None, newer: Callable[[], bool], later_rounds: bool = False
    ) -> Step | None:
        """The next ``kind`` step of this round (any round on ``base`` for ``open``); None on
        an abort, a phase timeout, or a newer global version."""
        waited = 0.0
        limit = None if kind == "open" else 2 * self.config.timeout_s
        while limit is None or waited < limit:
            if newer():
                return None
            arrived = await self.link.receive(POLL_S)
            waited += POLL_S
            if arrived is None:
                continue
            step = arrived.step
            if kind == "open" and self._takes(step, base, later_rounds):
                return step
            if rid is not None and step.round_id == rid and step.kind in (kind, "abort"):
                return step if step.kind == kind else None
            if step.kind == "open" and step.base_version >= base:
                self._reopened = step  # the coordinator moved on (a new attempt, or a restart)
                return None
        log.warning("secagg_phase_timeout", waiting_for=kind, round=rid)
        return None
