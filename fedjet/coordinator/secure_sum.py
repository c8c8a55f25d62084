"""The unmasked sum as the aggregator sees it: one contribution, for the service and replay.

A secure round yields the weighted average of the survivors' updates over the agreed
coordinates; it enters the strategy as a single contribution (for FedAvg and gradient steps
the average of the average is itself). Replay recomputes the same average from the recorded
transcript, so both sides share these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fedjet.codecs.flat import unflatten
from fedjet.codecs.record import ContributionRecord, SecureRecord
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.errors import ValidationError
from fedjet.secagg import Transcript, recompute_sum, scatter
from fedjet.secagg.config import SecureAggConfig
from fedjet.secagg.steps import agreed_indices

SECURE_SUM = "secure-sum"  # the contribution's name: no one cloud's


def transcript_blob_id(round_id: int) -> str:
    """Where a round's sealed transcript is found in the SECAGG stream (the record names the round)."""
    return f"transcript-{round_id}"


def secure_contribution(
    average: npt.NDArray[np.float32],
    *,
    job: str,
    base_version: int,
    base_hash: str,
    numel_masked: int,
    template: Weights,
    members: Sequence[tuple[int, float]],
) -> Contribution:
    """``average`` over the agreed coordinates, scattered back into tensors shaped like
    ``template``; ``members`` are the survivors' (samples, loss) claims, for the record."""
    numel = sum(t.numel() for t in template.values())
    indices = agreed_indices(job, base_hash, numel, numel_masked)
    tensors = unflatten(scatter(average, indices, numel), template)
    samples = sum(s for s, _ in members)
    loss = sum(s * loss for s, loss in members) / max(samples, 1)
    return Contribution(SECURE_SUM, base_version, samples, loss, tensors)


def recorded_average(transcript: Transcript, secure: SecureRecord, config: SecureAggConfig) -> npt.NDArray[np.float32]:
    """Replay: the survivors' weighted average, recomputed from what the coordinator received."""
    if transcript.config.round_id != secure.round_id or transcript.request.survivors != secure.survivors:
        raise ValidationError(f"the transcript is of round {transcript.config.round_id}, not the recorded one")
    if set(secure.weights) != set(secure.survivors):
        raise ValidationError("the record's weights are not the survivors'")
    total = recompute_sum(transcript)
    weight_total = secure.weight_total or sum(secure.weights.values())
    return config.fixed_point.decode(total, weight_total=weight_total)


def members_of(contributions: Sequence[ContributionRecord]) -> list[tuple[int, float]]:
    return [(c.samples, c.loss) for c in contributions]
