"""The observer that builds the report: follows every global version, evaluates it on the
held-out split, and records what the coordinator says about how it was made."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nacl.public import PrivateKey

from fedjet.channel.globals import GlobalFollower
from fedjet.codecs.messages import DPClaim, GlobalHead, GlobalVersion
from fedjet.codecs.record import VersionRecord
from fedjet.codecs.withheld import disclosed
from fedjet.privacy.accounting import claims_report
from fedjet.report import RoundRecord, round_line
from fedjet.runner.evaluate import Evaluator
from fedjet.worker.train import EvalResult


class Collector:
    """Evaluates every ``eval_every``-th version (and the first and last) and keeps a record."""

    def __init__(
        self,
        follower: GlobalFollower,
        evaluator: Evaluator,
        *,
        clouds: int,
        eval_every: int = 1,
        on_round: Callable[[RoundRecord], None] | None = None,
        coordinator: PrivateKey | None = None,
    ) -> None:
        """``coordinator``: the coordinator's key, where the runner holds it (``fedjet up``), to
        read the losses a record withholds from members and observers."""
        self.coordinator = coordinator
        self.follower = follower
        self.evaluator = evaluator
        self.clouds = clouds
        self.eval_every = max(1, eval_every)
        self.on_round = on_round
        self.rounds: list[RoundRecord] = []
        self.last_record: VersionRecord | None = None
        self.claims: dict[str, DPClaim] = {}  # each cloud's newest privacy claim (DP jobs)
        self._t0: float | None = None
        self._prev_t: float | None = None

    def privacy(self) -> dict[str, Any] | None:
        """The report's ``privacy`` section: enough to recompute each cloud's ε."""
        if not self.claims:
            return None
        return claims_report(self.claims)

    async def run(self) -> list[RoundRecord]:
        """Until the final version has been recorded."""
        while True:
            head = await self.follower.next_head()
            if self.rounds and head.version <= self.rounds[-1].version:
                if head.final:
                    return self.rounds
                continue
            version = await self.follower.fetch(head)
            record = await self._record(head, version)
            self.rounds.append(record)
            if self.on_round is not None:
                self.on_round(record)
            if head.final:
                return self.rounds

    def _workers_read(self, head: GlobalHead) -> int:
        """What the clouds read of this version (an estimate: the observer's own count times the
        clouds): the view's change under a lossy downlink (nothing where the view did not
        change), else the version as it crossed."""
        if head.final:
            return 0
        if head.view is not None and head.view.base >= 0:
            return head.view.size * self.clouds
        return self.follower.wire_bytes.get(head.version, 0) * self.clouds

    async def _record(self, head: GlobalHead, version: GlobalVersion) -> RoundRecord:
        record = self.follower.record(head)
        if self.coordinator is not None:
            record = disclosed(record, self.coordinator)
        self.last_record = record
        for c in record.contributions:
            if c.dp is not None:
                self.claims[c.cloud] = c.dp
        published = record.published_unix
        if self._t0 is None:
            self._t0 = self._prev_t = published
        assert self._prev_t is not None
        wall, round_s, self._prev_t = published - self._t0, published - self._prev_t, published
        result: EvalResult | None = None
        if head.version == 0 or head.final or head.version % self.eval_every == 0:
            result = await asyncio.to_thread(self.evaluator.evaluate, version.tensors)
        samples = record.samples or 1
        shares: dict[str, float] = {}
        for c in record.contributions:
            shares[c.cloud] = shares.get(c.cloud, 0.0) + c.samples / samples
        return RoundRecord(
            round=len(self.rounds),
            version=head.version,
            train_loss=record.train_loss,
            eval_loss=result.loss if result else None,
            eval_ppl=result.ppl if result else None,
            eval_acc=result.acc if result else None,
            bytes_up=record.bytes_up,
            bytes_down=self._workers_read(head),
            wall_s=wall,
            round_s=round_s,
            hash=head.hash,
            contributors=[c.cloud for c in record.contributions],
            staleness=[c.staleness for c in record.contributions],
            shares=shares,
            assignment=dict(record.assignment),
            applied_total=record.progress.applied_total,
            rejected_total=record.rejected_total,
        )


def print_round(record: RoundRecord) -> None:
    print(round_line(record), flush=True)
