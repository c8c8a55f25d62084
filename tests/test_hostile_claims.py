"""A worker that holds its own cloud's key and lies: claims are bounded by what the job makes
plausible, every tensor is required, each update is clipped relative to the global, and a
global that would not be finite is never made (the offending update is rejected instead)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.crypto import ReplayGuard
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, UpdateHeader, encode_update, frame_update
from fedjet.codecs.pipeline import CodecSpec, compress
from fedjet.config.job import JobConfig, ServerOptConfig, StopConfig, StrategyConfig, TrainConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.aggregate import Contribution
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.coordinator.strategies import Aggregator, Applied
from fedjet.coordinator.validate import max_loss, max_samples, max_tokens, norm, plausible_rate
from fedjet.errors import ConfigError, ValidationError
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, make_parties

CLOUDS = ("aws", "gcp")
PARTIES = make_parties(CLOUDS)


def job_spec(strategy: str = "fedavg", codec: str = "dense", **strategy_options) -> JobSpec:
    config = JobConfig(
        job="claims",
        clouds=CLOUDS,
        observers=(),
        codec=codec,
        strategy=StrategyConfig(name=strategy, **strategy_options),
        train=TrainConfig(local_steps=4, batch_size=8, seq_len=64),
        stop=StopConfig(rounds=1),
    )
    return JobSpec(config=config, model_config={"vocab_size": 257})


def sealed(cloud: str = "aws", tensors=None, codec: str = "dense", seq: int = 1, **claims) -> bytes:
    fields = {"samples": 8, "loss": 2.0, "tokens": 512} | claims
    header = UpdateHeader(job="claims", cloud=cloud, worker="0", seq=seq, base_version=0, **fields)
    tensors = tensors if tensors is not None else {n: torch.full(t.shape, 0.01) for n, t in WEIGHTS.items()}
    return crypto.seal_update(encode_update(Update(header, tensors), CodecSpec.parse(codec)), PARTIES[1][cloud])


def admit(envelope: bytes, spec: JobSpec):
    admission = Admission(spec, PARTIES[0], Limits.for_model(1020, 2))
    return admission.admit(envelope, "aws", WEIGHTS, lambda base: 0, ReplayGuard()).contribution


@pytest.mark.parametrize(
    "strategy, claims, message",
    [
        ("fedavg", {"samples": 2**62}, "samples"),  # vetoed FedAvg rounds
        ("fedavg", {"tokens": 10**9}, "tokens"),  # starved honest clouds under --partition dynamic
        ("fedavg", {"loss": -1.0}, "loss"),  # no cross-entropy is negative
        ("fedavg", {"loss": 1e308}, "loss"),  # the record's train_loss became Infinity
        ("fedbuff", {"heldout_loss": 1e308}, "held-out loss"),
        ("dynamic", {"loss": -50.0}, "loss"),  # took all the weight
        ("dynamic", {"loss": -1e308}, "loss"),  # made every weight NaN
        ("dynamic", {"loss": 1e6}, "loss"),
    ],
)
def test_implausible_claims_are_validation_errors(strategy, claims, message):
    with pytest.raises(ValidationError, match=message):
        admit(sealed(**claims), job_spec(strategy))


def test_claims_within_the_jobs_bounds_are_admitted():
    spec = job_spec("dynamic")
    assert max_tokens(spec) == 4 * 8 * 64 and max_loss(spec) == pytest.approx(4 * math.log(257))
    contribution = admit(sealed(samples=max_samples(spec), tokens=max_tokens(spec), loss=max_loss(spec)), spec)
    assert contribution.samples == max_samples(spec)


def test_every_tensor_is_required_and_dense_jobs_take_dense_tensors():
    with pytest.raises(ValidationError, match="missing"):  # a zero update under a huge sample claim
        admit(sealed(tensors={}), job_spec())
    with pytest.raises(ValidationError, match="missing"):
        admit(sealed(tensors={"w": torch.zeros(50, 20)}), job_spec())
    with pytest.raises(ValidationError, match="dense"):
        admit(sealed(codec="topk:0.1+int8"), job_spec())
    header = UpdateHeader(job="claims", cloud="aws", worker="0", seq=1, base_version=0, samples=8, loss=2.0)
    tiny = {"w": torch.zeros(50, 20), "b": torch.zeros(20)}
    tiny["w"][0, 0] = 1.0  # global top-k keeps nothing of b: its entry is there, empty
    entries = compress(tiny, CodecSpec.parse("topk:0.0001:global")).entries
    envelope = crypto.seal_update(frame_update(header, entries), PARTIES[1]["aws"])
    assert set(admit(envelope, job_spec(codec="topk:0.0001:global")).tensors) == {"w", "b"}


def part(cloud: str, value: float, samples: int = 8) -> Applied:
    return Applied(Contribution(cloud, 0, samples, 2.0, {n: torch.full(t.shape, value) for n, t in WEIGHTS.items()}), 0)


def test_each_update_is_clipped_relative_to_the_global():
    aggregator = Aggregator(StrategyConfig(name="fedavg"), dict(WEIGHTS))
    aggregator.apply([part("aws", 3e38, samples=2**30), part("gcp", 0.01)])
    moved = norm({n: aggregator.weights[n] - WEIGHTS[n] for n in WEIGHTS})
    assert math.isfinite(moved) and moved <= 2.0 * norm(WEIGHTS) * (1 + 1e-5)
    with pytest.raises(ConfigError):
        StrategyConfig(clip_update=-1.0)


def test_a_global_that_would_not_be_finite_is_never_made():
    strategy = StrategyConfig(name="fedavg", clip_update=0.0, server=ServerOptConfig(lr=4.0))  # clipping off
    aggregator = Aggregator(strategy, dict(WEIGHTS))
    assert aggregator.apply_finite([part("aws", 3e38), part("gcp", 0.01)]) == [0]
    honest = Aggregator(strategy, dict(WEIGHTS))
    honest.apply([part("gcp", 0.01)])
    assert aggregator.version == 1 and aggregator.hash == honest.hash
    assert aggregator.apply_finite([part("aws", 3e38)]) == [0] and aggregator.version == 1  # last good kept


def test_claimed_speed_is_floored_by_what_the_coordinator_saw():
    assert plausible_rate(1000, 10.0, 4.0) == 100.0  # honest: the claim stands
    assert plausible_rate(1000, 1e-9, 10.0) == 200.0  # "instant" is believed at most 2x past the observed
    assert plausible_rate(0, 1.0, 1.0) is None


def test_the_live_coordinator_rejects_a_liar_and_never_publishes_a_non_finite_global(nats_url):
    coord = PARTIES[0]
    strategy = {"clip_update": 0.0, "server": ServerOptConfig(lr=4.0)}
    spec = job_spec("fedavg", **strategy)
    service = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec, boxes=coord, idle_timeout_s=30))
    subjects = JobSubjects("claims")

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()
        try:
            task = asyncio.create_task(service.run(dict(WEIGHTS)))
            await asyncio.wait_for(service.serving.wait(), 30)
            huge = {n: torch.full(t.shape, 3e38) for n, t in WEIGHTS.items()}
            for cloud, data in (
                ("aws", sealed("aws", loss=1e308, seq=1)),  # finite, but the round's mean loss would not be
                ("aws", sealed("aws", samples=2**62, seq=2)),  # an absurd claim
                ("aws", sealed("aws", tensors=huge, seq=3)),  # finite, but would make the global Inf
                ("gcp", sealed("gcp", seq=1)),
            ):
                blob = f"{cloud}-{len(data)}-{data[-4:].hex()}"
                await publish_blob(js, subjects.update(cloud), data, blob_id=blob, max_payload=nc.max_payload)
            return await asyncio.wait_for(task, 60)
        finally:
            await close_quietly(nc)

    ledger = asyncio.run(scenario())
    assert ledger.rejected == {"ValidationError": 2, "NonFiniteError": 1} and ledger.applied == 1
    assert all(bool(torch.isfinite(t).all()) for t in service.aggregator.weights.values())
    assert service.aggregator.version == 1 and service.last_head.final
