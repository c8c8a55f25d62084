"""The coordinator's check of a DP job's privacy claims, and each cloud's budget. Pure.

A worker cannot prove how much noise it added, but it can be held to the job's parameters:
every update of a DP job must carry a claim, with the job's clip, delta and accountant, an ε
that ``dp-accounting`` recomputes from the claimed (noise, sample rate, steps), within the
job's budget, and more steps than that worker claimed before.

:class:`PrivacyBudget` is the state admission checks claims against (as a
:class:`~fedjet.codecs.crypto.ReplayGuard` is for sequence numbers): the live coordinator keeps
one for the job, restored from the newest record after a restart, and ``fedjet replay`` builds
its own from the recorded claims as it re-admits the same updates through the same call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedjet.codecs.messages import DPClaim, UpdateHeader
from fedjet.codecs.record import ContributionRecord, Progress
from fedjet.config.privacy import DPConfig
from fedjet.errors import PrivacyError
from fedjet.privacy.accounting import epsilon_for

RELATIVE_TOLERANCE = 1e-6


def check_claim(claim: DPClaim | None, job: DPConfig | None, previous_steps: int) -> None:
    if job is None:
        return
    if claim is None:
        raise PrivacyError("an update of a DP job carries no privacy claim")
    if claim.clip != job.clip or claim.delta != job.delta or claim.accountant != job.accountant:
        raise PrivacyError(
            f"claims clip={claim.clip}, delta={claim.delta}, {claim.accountant}; the job has clip={job.clip}, "
            f"delta={job.delta}, {job.accountant}"
        )
    if job.noise is not None and claim.noise != job.noise:
        raise PrivacyError(f"claims noise {claim.noise}, the job's is {job.noise}")
    if claim.steps <= previous_steps:
        raise PrivacyError(f"claims {claim.steps} steps in all, not more than the {previous_steps} claimed before")
    recomputed = epsilon_for(claim.noise, claim.sample_rate, claim.steps, claim.delta, claim.accountant)
    if not math.isclose(recomputed, claim.epsilon, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9):
        raise PrivacyError(f"claims epsilon {claim.epsilon:.6g}; its parameters give {recomputed:.6g}")
    if job.epsilon is not None and recomputed > job.epsilon * (1 + RELATIVE_TOLERANCE):
        raise PrivacyError(f"epsilon {recomputed:.4g} is over the job's budget {job.epsilon}")


@dataclass
class PrivacyBudget:
    """The DP steps each cloud has claimed, in all: per cloud, since all its workers spend one
    budget (the records are the cloud's). Every version's record carries a snapshot
    (``progress.dp_steps``), so a restart keeps it and a restarted worker learns its floor."""

    steps: dict[str, int] = field(default_factory=dict)

    @classmethod
    def restore(cls, progress: Progress) -> PrivacyBudget:
        """The budget as the record of the version a coordinator resumes from left it."""
        return cls(dict(progress.dp_steps))

    @classmethod
    def claimed_in(cls, contributions: Iterable[ContributionRecord]) -> PrivacyBudget:
        """The steps the recorded (applied) updates claimed: what re-admitting them counts."""
        budget = cls()
        for c in contributions:
            if c.dp is not None:
                budget.spend(c.cloud, c.dp.steps)
        return budget

    def charge(self, header: UpdateHeader, job: DPConfig | None) -> None:
        """Refuse an update whose claim breaks the job's budget or rewinds its cloud's count;
        otherwise its steps are the cloud's floor from now on (whatever becomes of the update)."""
        check_claim(header.dp, job, self.steps.get(header.cloud, 0))
        if header.dp is not None:
            self.spend(header.cloud, header.dp.steps)

    def spend(self, cloud: str, steps: int) -> None:
        self.steps[cloud] = max(steps, self.steps.get(cloud, 0))

    def snapshot(self) -> dict[str, int]:
        return dict(self.steps)
