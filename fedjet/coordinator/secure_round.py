"""One secure-aggregation round, driven by the coordinator over the broker.

The pure :class:`ServerRound` decides; this module carries its messages and keeps time. A
round opens on a base version, then each phase waits for every member it expects, or, once
the threshold is in, for ``timeout`` seconds more: the members that have not answered by then
count as dropped. Fewer than the threshold ends the round with ``SecAggAbort``; the caller
counts it and opens the next attempt on the same base. Anything a member sends that does not
fit (another round, a forged signature, a second copy) is counted and skipped.

Weights are not the coordinator's to choose: each member computes its own from its update
header and the job's rule, signs it in its advertisement and masks its update times it; this
module only checks that an advertised weight follows the rule from the header that came with
it (``Weighing.rule``: formulas 1 and 3 weigh by sample count, FedBuff by ``s(tau_i)`` over a
buffer of the first K advertisers, whose updates may be stale), and decodes the unmasked sum
with the survivors' own signed weights (``fedjet.secagg.average``). Before anyone reveals,
every survivor signs the unmask request (the consistency round) and gets the others' signatures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from nacl.signing import VerifyKey

from fedjet.channel.secagg import Arrived, SecAggLink
from fedjet.codecs.messages import UpdateHeader
from fedjet.config.secure_agg import SecureAggConfig
from fedjet.errors import FedjetError, SchemaError, Terminated, ValidationError
from fedjet.log import get_logger
from fedjet.secagg import (
    Advertise,
    Confirm,
    MaskedInput,
    Reveal,
    RoundConfig,
    ServerRound,
    ShareKeys,
    Transcript,
    WeightRule,
    average,
)
from fedjet.secagg.fixedpoint import FixedPoint
from fedjet.secagg.steps import Step, round_id
from fedjet.secagg.unmask import survivor_weights

log = get_logger("fedjet.coordinator")
POLL_S = 0.25


class RoundIdle(FedjetError):
    """No member advertised within the idle timeout: the job's wait ends."""


@dataclass(frozen=True)
class Weighing:
    """How a round weighs its members: which bases it takes, when its advertisements close, and
    the rule every member weighs itself by (the coordinator only checks it was followed)."""

    max_staleness: int  # 0: only updates made from this round's base (synchronous rounds)
    close_at: int  # advertisements close once this many are in (all clouds, or the buffer)
    rule: WeightRule


def by_samples(members: int, max_weight: int) -> Weighing:
    """Formulas 1 and 3: ``n_i`` over the survivors' ``sum(n_i)``; a round waits for every
    member (or its phase timeout once the threshold is in)."""
    return Weighing(max_staleness=0, close_at=members, rule=WeightRule(max_weight=max_weight))


def by_staleness(staleness: Callable[[int], float], max_staleness: int, buffer: int, max_weight: int) -> Weighing:
    """FedBuff: ``s(tau_i)``, one unit each; the average over survivors is the mean of ``s(tau_i) * delta_i``."""
    rule = WeightRule(max_weight=max_weight, staleness=staleness, max_staleness=max_staleness)
    return Weighing(max_staleness=max_staleness, close_at=buffer, rule=rule)


@dataclass
class SecureOutcome:
    """A completed round: the weighted average over survivors, and what replay needs."""

    round_id: int
    average: npt.NDArray[np.float32]  # over the agreed coordinates
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    weights: dict[str, float]  # each survivor's coefficient in the average (its signed weight / units)
    weight_total: float  # 1.0: the average is sum(weights[m] * x_m)
    headers: dict[str, UpdateHeader]
    transcript: Transcript
    member_bytes: dict[str, int] = field(default_factory=dict)
    masked_seq: dict[str, int] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)  # when each advertisement came (monotonic)


class SecureRound:
    """``await SecureRound(...).run()``: one attempt on ``base_version``."""

    def __init__(
        self,
        link: SecAggLink,
        *,
        job: str,
        clouds: tuple[str, ...],
        config: SecureAggConfig,
        base_version: int,
        base_hash: str,
        weighing: Weighing,
        attempt: int,
        numel: int,
        verify_keys: dict[str, VerifyKey],
        check_header: Callable[[UpdateHeader, str], None],
        on_reject: Callable[[str, str, str], None],
        stopping: Callable[[], bool],
        idle_timeout_s: float,
    ) -> None:
        self.link = link
        self.config = config
        self.base_version = base_version
        self.base_hash = base_hash
        self.weighing = weighing
        self.round = RoundConfig(
            job=job,
            round_id=round_id(base_version, attempt),
            threshold=config.threshold_for(len(clouds)),
            members=tuple(sorted(clouds)),
            numel=numel,
        )
        self.server = ServerRound(config=self.round, verify_keys=verify_keys)
        self._check_header = check_header
        self._on_reject = on_reject
        self._stopping = stopping
        self._idle_timeout_s = idle_timeout_s
        self.headers: dict[str, UpdateHeader] = {}
        self.member_bytes: dict[str, int] = {}
        self.masked_seq: dict[str, int] = {}
        self.arrived: dict[str, float] = {}

    def _step(self, kind: str, body: dict[str, object] | None = None, **extra: object) -> Step:
        return Step(
            kind=kind, round_id=self.round.round_id, base_version=self.base_version, body=body or {}, extra=extra
        )

    async def run(self) -> SecureOutcome:
        rc = self.round
        opened = self._step(
            "open", members=list(rc.members), threshold=rc.threshold, numel=rc.numel, base_hash=self.base_hash
        )
        for member in rc.members:
            await self.link.send(member, opened)
        log.info("secagg_round_open", round=rc.round_id, base=self.base_version, threshold=rc.threshold)
        await self._collect("advertise", set(rc.members), self._advert, wait_for_first=True)
        adverts = self.server.close_adverts()
        advertisers = tuple(a.member for a in adverts.adverts)
        for member in advertisers:
            await self.link.send(member, self._step("adverts", adverts.to_wire()))
        await self._collect(
            "shares", set(advertisers), lambda a: self.server.receive_shares(ShareKeys.from_wire(a.step.body))
        )
        deliveries = self.server.close_shares()
        for member, delivery in deliveries.items():
            await self.link.send(member, self._step("deliver", delivery.to_wire()))
        await self._collect("masked", set(deliveries), self._masked)
        request = self.server.close_masked()
        for member in request.survivors:
            await self.link.send(member, self._step("unmask", request.to_wire()))
        await self._collect(
            "confirm", set(request.survivors), lambda a: self.server.receive_confirm(Confirm.from_wire(a.step.body))
        )
        confirmations = self.server.close_confirms()
        for member in self.server.confirmed:
            await self.link.send(member, self._step("confirmed", confirmations.to_wire()))
        await self._collect(
            "reveal", set(self.server.confirmed), lambda a: self.server.receive_reveal(Reveal.from_wire(a.step.body))
        )
        total = self.server.finish()
        transcript = self.server.transcript
        mean = average(transcript, total, FixedPoint.for_job(self.config))  # the members' own signed weights
        own = survivor_weights(transcript)
        units = sum(w.units for w in own.values())
        log.info(
            "secagg_round_done", round=rc.round_id, survivors=len(request.survivors), dropped=list(request.dropped)
        )
        return SecureOutcome(
            round_id=rc.round_id,
            average=mean,
            survivors=request.survivors,
            dropped=request.dropped,
            weights={m: w.weight / units for m, w in own.items()},
            weight_total=1.0,
            headers={m: self.headers[m] for m in request.survivors},
            transcript=transcript,
            member_bytes=dict(self.member_bytes),
            masked_seq=dict(self.masked_seq),
            arrived=dict(self.arrived),
        )

    async def abort_members(self, reason: str) -> None:
        """Tell every member this attempt is over, so none waits for it to time out."""
        for member in self.round.members:
            try:
                await self.link.send(member, self._step("abort", reason=reason[:200]))
            except FedjetError as e:
                log.warning("secagg_abort_not_sent", member=member, error=str(e)[:200])

    def _advert(self, arrived: Arrived) -> None:
        raw = arrived.step.extra.get("header")
        if not isinstance(raw, dict):
            raise SchemaError("an advertisement must carry the member's update header")
        try:
            header = UpdateHeader.from_wire(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"update header: {type(e).__name__}: {e}") from e
        tau = self.base_version - header.base_version
        if header.cloud != arrived.sender or not 0 <= tau <= self.weighing.max_staleness:
            raise ValidationError(f"{arrived.sender}'s header names {header.cloud} on base {header.base_version}")
        self._check_header(header, arrived.sender)
        advert = Advertise.from_wire(arrived.step.body)
        expected = self.weighing.rule.of(samples=header.samples, tau=tau)
        if (advert.weight, advert.units) != (expected.weight, expected.units):
            raise ValidationError(
                f"{arrived.sender} weighs itself {advert.weight}/{advert.units}, the job's rule gives "
                f"{expected.weight}/{expected.units} for its header"
            )
        self.server.receive_advert(advert)
        self.headers[arrived.sender] = header
        self.arrived[arrived.sender] = time.monotonic()

    def _masked(self, arrived: Arrived) -> None:
        self.server.receive_masked(MaskedInput.from_wire(arrived.step.body))
        self.masked_seq[arrived.sender] = arrived.stream_seq

    async def _collect(
        self, kind: str, expect: set[str], handle: Callable[[Arrived], None], *, wait_for_first: bool = False
    ) -> None:
        """Take ``kind`` steps until every expected member answered or the phase times out.

        The advertisement phase waits for members still training: its clock starts once the
        threshold is in (or the idle timeout ends the job's wait for good)."""
        got: set[str] = set()
        started = time.monotonic()
        deadline = None if wait_for_first else started + self.config.timeout_s
        while got != expect:
            now = time.monotonic()
            if self._stopping():
                raise Terminated("the coordinator is stopping")
            if deadline is not None and now >= deadline:
                break
            if deadline is None and now - started > self._idle_timeout_s:
                raise RoundIdle(f"{len(got)} of {self.round.threshold} members advertised in {self._idle_timeout_s} s")
            arrived = await self.link.receive(POLL_S if deadline is None else min(POLL_S, deadline - now))
            if arrived is None:
                continue
            if arrived.step.round_id == self.round.round_id and arrived.step.kind == "advertise" != kind:
                log.info("secagg_advert_after_close", member=arrived.sender)  # it joins the next round
                continue
            if arrived.step.round_id != self.round.round_id or arrived.step.kind != kind:
                self._on_reject(
                    "StaleRoundError", arrived.sender, f"{arrived.step.kind} of round {arrived.step.round_id}"
                )
                continue
            if arrived.sender not in expect or arrived.sender in got:
                self._on_reject("SecAggProtocolError", arrived.sender, f"unexpected {kind} step")
                continue
            try:
                handle(arrived)
            except FedjetError as e:
                self._on_reject(e.reason, arrived.sender, str(e))
                continue
            got.add(arrived.sender)
            self.member_bytes[arrived.sender] = self.member_bytes.get(arrived.sender, 0) + arrived.wire_bytes
            if wait_for_first and len(got) >= self.weighing.close_at:
                break  # the buffer is full
            if deadline is None and len(got) >= self.round.threshold:
                deadline = time.monotonic() + self.config.timeout_s
