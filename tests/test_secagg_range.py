"""Secure aggregation's ring bound (issue items 5 and 8): a masked contribution no clipped input
can make is refused, in memory, at replay and through the real coordinator service."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import pytest
import torch
from nacl.signing import SigningKey

from fedjet.codecs.messages import UpdateHeader
from fedjet.codecs.record import SecureRecord
from fedjet.config.secure_agg import SecureAggConfig
from fedjet.coordinator.secure_sum import recorded_average
from fedjet.secagg import (
    FixedPoint,
    MemberRound,
    OutOfRangeError,
    RoundConfig,
    ServerRound,
    Weight,
    average,
    recompute_sum,
)
from tests.conftest import make_parties


def test_a_masked_contribution_beyond_the_bound_is_refused_live_and_at_replay():
    """A member that encodes 50 where the job's bound is 1 passes every per-message check (a
    masked vector is uniform either way); the unmasked sum is then beyond what clipped inputs of
    the survivors' weights can add up to, and both the coordinator and replay refuse it."""
    names = ("aws", "azure", "gcp")
    signing = {m: SigningKey.generate() for m in names}
    verify = {m: k.verify_key for m, k in signing.items()}
    fp, cheat = FixedPoint(), FixedPoint(bound=100.0)
    config = SecureAggConfig()

    def round_with(encoders: dict[str, FixedPoint]) -> tuple[Any, np.ndarray]:
        rc = RoundConfig(job="job", round_id=3, threshold=2, members=names, numel=64)
        members = {m: MemberRound(config=rc, member=m, signing_key=signing[m], verify_keys=verify,
                                  weight=Weight(10, 10)) for m in names}  # fmt: skip
        server = ServerRound(config=rc, verify_keys=verify)
        for m in names:
            server.receive_advert(members[m].advertise())
        listing = server.close_adverts()
        for m in names:
            server.receive_shares(members[m].share_keys(listing))
        for m, delivery in server.close_shares().items():
            members[m].receive_shares(delivery)
            value = 50.0 if encoders[m] is cheat else 0.5
            server.receive_masked(members[m].mask(encoders[m].encode(np.full(64, value), weight=10)))
        request = server.close_masked()
        for m in names:
            server.receive_confirm(members[m].confirm(request))
        confirmations = server.close_confirms()
        for m in names:
            server.receive_reveal(members[m].reveal(confirmations))
        return server.transcript, server.finish()

    transcript, total = round_with(dict.fromkeys(names, fp))
    np.testing.assert_allclose(average(transcript, total, fp), 0.5, atol=1e-6)
    transcript, total = round_with({"aws": cheat, "azure": fp, "gcp": fp})
    with pytest.raises(OutOfRangeError):
        average(transcript, total, fp)
    record = SecureRecord(round_id=3, numel=64, survivors=names, weights=dict.fromkeys(names, 1 / 3))
    with pytest.raises(OutOfRangeError):
        recorded_average(transcript, record, config)
    np.testing.assert_array_equal(recompute_sum(transcript, verify), total)  # the sum itself is what was sent


def test_the_coordinator_service_refuses_an_out_of_range_round_and_applies_nothing(nats_url):
    """Through the real coordinator: gcp masks 50 where the job's bound is 1 (a worker built to
    skip the clipping). Every attempt's unmasked sum is out of range: it is counted as
    ``OutOfRangeError``, the members are told, and no version is made from it."""
    from tests.test_secagg_rounds import CLOUDS, WEIGHTS, joined, running, spec

    job = "sa-range"
    coord, parties = make_parties(CLOUDS)
    job_spec = spec(job)
    honest = job_spec.config.secure_agg_config
    cheat = dataclasses.replace(honest, bound=100.0)

    async def scenario():
        async with running(nats_url, job_spec, coord) as run:
            coordinator = run.coordinator
            stop = asyncio.Event()
            work = []
            for cloud in CLOUDS:
                member = await joined(run.nc, job, cloud, parties, cheat if cloud == "gcp" else honest, run.links)
                value = 50.0 if cloud == "gcp" else 0.01
                update = {n: torch.full(t.shape, value) for n, t in WEIGHTS.items()}
                header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=1, base_version=0, samples=10, loss=2.0)
                work.append(asyncio.ensure_future(member.contribute(update, header, coordinator.last_head.hash,
                                                                    stop.is_set)))  # fmt: skip
            deadline = time.monotonic() + 60
            while not coordinator.ledger.rejected.get("OutOfRangeError") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            refused = dict(coordinator.ledger.rejected)
            version = coordinator.aggregator.version
            stop.set()
            await asyncio.wait_for(asyncio.gather(*work), 30)
            return refused, version

    refused, version = asyncio.run(scenario())
    assert refused.get("OutOfRangeError", 0) >= 1, f"no out-of-range round was refused within 60 s: {refused}"
    assert version == 0
