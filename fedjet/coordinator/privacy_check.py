"""The coordinator's check of a DP job's privacy claims. Pure.

A worker cannot prove how much noise it added, but it can be held to the job's parameters:
every update of a DP job must carry a claim, with the job's clip, delta and accountant, an ε
that ``dp-accounting`` recomputes from the claimed (noise, sample rate, steps), within the
job's budget, and more steps than that worker claimed before.
"""

from __future__ import annotations

import math

from fedjet.codecs.messages import DPClaim
from fedjet.errors import PrivacyError
from fedjet.privacy.accounting import epsilon_for
from fedjet.privacy.config import DPConfig

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
