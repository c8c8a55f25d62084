"""The unmasked sum as the aggregator sees it: one contribution, for the service and replay.

A secure round yields the weighted average of the survivors' updates over the agreed
coordinates; it enters the strategy as a single contribution (for FedAvg and gradient steps
the average of the average is itself). Replay recomputes the same average from the recorded
transcript, so both sides share these two functions.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.signing import VerifyKey

from fedjet.broker.blobs import H_BLOB
from fedjet.broker.jetstream import read_blob, read_range
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.flat import unflatten
from fedjet.codecs.record import ContributionRecord, SecureRecord
from fedjet.config.secure_agg import SecureAggConfig
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.errors import ValidationError
from fedjet.secagg import Transcript, average, recompute_sum, scatter
from fedjet.secagg.fixedpoint import FixedPoint
from fedjet.secagg.steps import agreed_indices
from fedjet.secagg.unmask import survivor_weights

SECURE_SUM = "secure-sum"  # the contribution's name: no one cloud's


def transcript_blob_id(round_id: int) -> str:
    """A fresh, unguessable blob id for a round's sealed transcript: a member that knows the
    round id cannot publish under it first (JetStream would drop the coordinator's copy as a
    duplicate). Replay finds it at the first stream sequence the record names."""
    return f"transcript-{round_id}-{secrets.token_hex(16)}"


async def read_transcript_blob(js: Any, subjects: JobSubjects, secure: SecureRecord, max_bytes: int) -> bytes:
    """The sealed transcript the record points at: the blob whose first chunk is at
    ``transcript_first`` (its id names the round), reassembled from that range."""
    first = None
    async for msg in read_range(js, subjects.secagg_stream, subjects.secagg_transcript,
                                secure.transcript_first, secure.transcript_first):  # fmt: skip
        first = msg
    blob_id = (first.headers or {}).get(H_BLOB, "") if first is not None else ""
    if not blob_id.startswith(f"transcript-{secure.round_id}-"):
        raise ValidationError(f"stream seq {secure.transcript_first} holds no transcript of round {secure.round_id}")
    return await read_blob(
        js, subjects.secagg_stream, subjects.secagg_transcript, secure.transcript_first, secure.transcript_last,
        blob_id=blob_id, max_bytes=max_bytes,
    )  # fmt: skip


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


def recorded_average(
    transcript: Transcript,
    secure: SecureRecord,
    config: SecureAggConfig,
    verify_keys: Mapping[str, VerifyKey] | None = None,
) -> npt.NDArray[np.float32]:
    """Replay: the survivors' weighted average, recomputed from what the coordinator received,
    with the weights the members signed (the record's must agree: they are only the coordinator's);
    with ``verify_keys``, every member signature in the transcript is checked too."""
    if transcript.config.round_id != secure.round_id or transcript.request.survivors != secure.survivors:
        raise ValidationError(f"the transcript is of round {transcript.config.round_id}, not the recorded one")
    own = survivor_weights(transcript)
    units = sum(w.units for w in own.values())
    if set(secure.weights) != set(own) or any(
        not math.isclose(secure.weights[m], w.weight / units, rel_tol=1e-9) for m, w in own.items()
    ):
        raise ValidationError("the record's weights are not the ones the survivors signed")
    total = recompute_sum(transcript, verify_keys)
    return average(transcript, total, FixedPoint.for_job(config))


def members_of(contributions: Sequence[ContributionRecord]) -> list[tuple[int, float]]:
    return [(c.samples, c.loss) for c in contributions]
