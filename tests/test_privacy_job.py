"""Differential privacy in a real job: claims checked by the coordinator, the budget a hard limit."""

from __future__ import annotations

import json
import uuid

import pytest

from fedjet.codecs.messages import DPClaim
from fedjet.config.privacy import parse_dp
from fedjet.coordinator.privacy_check import check_claim
from fedjet.errors import PrivacyError
from fedjet.privacy.accounting import epsilon_for
from tests.twin_runs import FLOAT_ORDER, largest_difference, run_side_by_side

JOB_DP = parse_dp("epsilon=4,delta=1e-5,clip=1.0")


def claim(epsilon: float | None = None, **changes) -> DPClaim:
    fields = {"noise": 1.1, "sample_rate": 0.01, "steps": 40, "delta": 1e-5, "clip": 1.0, "accountant": "rdp"}
    fields |= changes
    if epsilon is None:  # what an honest worker claims: the accountant's ε for its parameters
        epsilon = epsilon_for(fields["noise"], fields["sample_rate"], fields["steps"], fields["delta"])
    return DPClaim(epsilon=epsilon, **fields)


def test_an_honest_claim_passes_and_a_job_without_dp_asks_for_none():
    check_claim(claim(), JOB_DP, previous_steps=20)
    check_claim(None, None, previous_steps=0)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (None, "no privacy claim"),
        (claim(clip=5.0), "clip"),
        (claim(delta=1e-3), "delta"),
        (claim(accountant="pld"), "rdp"),
        (claim(epsilon=0.5), "its parameters give"),  # an ε the accountant does not confirm
        (claim(noise=0.3), "over the job's budget"),  # too little noise for the budget
        (claim(steps=20), "not more than"),  # steps must grow: no rewinding the ledger
    ],
)
def test_the_coordinator_refuses_missing_or_foreign_privacy_claims(bad, match):
    with pytest.raises(PrivacyError, match=match):
        check_claim(bad, JOB_DP, previous_steps=20)


@pytest.mark.e2e
def test_a_dp_job_learns_and_stops_when_the_budget_is_spent(tmp_path, data_dir):
    """σ is calibrated for 2 updates at ε = 8; the job asks for 4 rounds, so every cloud retires
    after its second update and the run ends cleanly at version 2 with ε ≤ 8 per cloud. A twin
    job with the same seed and data runs beside it: the noise is not determined by the spec, so
    the two export different models (two plain twins stay identical: test_e2e_up.py)."""
    report_path, saved, twin = tmp_path / "report.json", tmp_path / "model", tmp_path / "twin"
    flags = ["--data", str(data_dir), "--dp", "epsilon=8,delta=1e-5,clip=1,updates=2", "--rounds", "4",
             "--clouds", "aws,gcp", "--local-steps", "6", "--batch-size", "8", "--seq-len", "64", "--lr", "0.005",
             "--eval-tokens", "4096", "--quiet", "--seed", "0"]  # fmt: skip
    run_side_by_side([
        ["up", "--job", f"dp-{uuid.uuid4().hex[:6]}", "--report", str(report_path), "--save", str(saved), *flags],
        ["up", "--job", f"dp-{uuid.uuid4().hex[:6]}", "--save", str(twin), *flags],
    ])  # fmt: skip
    assert largest_difference(saved, twin) > 100 * FLOAT_ORDER
    report = json.loads(report_path.read_text())
    privacy = report["privacy"]
    assert report["summary"]["versions"] == 2 and report["summary"]["updates_applied"] == 4
    assert privacy["steps"] == {"aws": 12, "gcp": 12}
    for cloud, eps in privacy["epsilon"].items():
        noise = privacy["noise_multiplier"][cloud] if isinstance(privacy["noise_multiplier"], dict) else None
        rate = privacy["sample_rate"][cloud] if isinstance(privacy["sample_rate"], dict) else None
        assert eps <= 8.0
        assert eps == pytest.approx(
            epsilon_for(noise or privacy["noise_multiplier"], rate or privacy["sample_rate"], 12, 1e-5)
        )
    assert all(c["retired"] for c in report["clouds"].values())
    for cloud, stats in report["clouds"].items():  # what fedjet status and the metrics show
        assert stats["dp_epsilon"] == pytest.approx(privacy["epsilon"][cloud])
    rounds = report["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    exported = json.loads((saved / "fedjet.json").read_text())  # the model records its ε/δ
    assert exported["privacy"]["epsilon"] == privacy["epsilon"] and exported["privacy"]["delta"] == 1e-5


def test_central_dp_clips_each_update_and_draws_its_noise_from_the_recorded_key():
    """DP-FedAvg in the aggregator: every update is clipped to ``clip`` and weighted alike; the
    noise comes from a fresh CSPRNG key per version, and replaying with that key reproduces it."""
    import torch

    from fedjet.config.job import StrategyConfig
    from fedjet.coordinator.aggregate import Contribution
    from fedjet.coordinator.central_dp import central_epsilon
    from fedjet.coordinator.strategies import Aggregator, Applied

    weights = {"w": torch.zeros(1000)}
    config = StrategyConfig(name="fedavg", central_dp="clip=0.5,noise=0.00001")
    big = Contribution("aws", 0, 1000, 1.0, {"w": torch.full((1000,), 1.0)})  # norm 31.6, weight 1000
    small = Contribution("gcp", 0, 1, 1.0, {"w": torch.full((1000,), -0.001)})  # norm 0.03
    batch = [Applied(big, 0), Applied(small, 0)]
    live = Aggregator(config, dict(weights), clouds=2)
    first = live.apply(batch)
    assert len(live.last_noise_key) == 32
    again = Aggregator(config, dict(weights), clouds=2).apply(batch)
    assert not torch.equal(first["w"], again["w"])  # a fresh key: nobody can redraw the noise
    replayed = Aggregator(config, dict(weights), clouds=2).apply(batch, noise_key=live.last_noise_key)
    assert torch.equal(replayed["w"], first["w"])  # the recorded key reproduces it bit for bit
    expected = (0.5 / 1000**0.5 - 0.001) / 2  # aws clipped to norm 0.5, equal weights
    assert torch.allclose(first["w"], torch.full((1000,), expected), atol=1e-4)
    with pytest.raises(ValueError, match="fedavg or fedbuff"):
        StrategyConfig(name="async", central_dp="clip=1,noise=1")
    assert central_epsilon(parse_central("clip=1,noise=1"), 10) > central_epsilon(parse_central("clip=1,noise=1"), 5)


def test_central_dp_divides_by_the_expected_count_not_by_who_arrived():
    """The sensitivity argument: one cloud's clipped update moves the version by at most
    clip / expected, and the noise is sized for that, however many updates came."""
    import torch

    from fedjet.config.job import StrategyConfig
    from fedjet.coordinator.aggregate import Contribution
    from fedjet.coordinator.strategies import Aggregator, Applied

    config = StrategyConfig(name="fedavg", central_dp="clip=1,noise=2")
    start = {"w": torch.ones(200_000)}  # norm 447: --clip-update does not bind
    lone = Contribution("aws", 0, 1, 1.0, {"w": torch.full((200_000,), 1.0)})  # clipped to norm 1
    alone = Aggregator(config, dict(start), clouds=3)
    moved = alone.apply([Applied(lone, 0)])["w"]
    nobody = Aggregator(config, dict(start), clouds=3)  # the neighbour without aws, same noise draw
    empty = Contribution("gcp", 0, 1, 1.0, {"w": torch.zeros(200_000)})
    without = nobody.apply([Applied(empty, 0)], noise_key=alone.last_noise_key)["w"]
    assert float((without - 1).std()) == pytest.approx(2 * 1.0 / 3, rel=0.02)  # z * clip / expected
    signal = moved - without  # aws's clipped update over the 3 clouds the round expects, not over 1
    assert torch.allclose(signal, torch.full((200_000,), 1.0 / 200_000**0.5 / 3), rtol=1e-3, atol=1e-6)
    gap = float(torch.linalg.vector_norm(signal))
    assert gap == pytest.approx(1.0 / 3, rel=1e-4)  # the sensitivity the accountant assumes


def parse_central(text: str):
    from fedjet.config.privacy import parse_central_dp

    return parse_central_dp(text)
