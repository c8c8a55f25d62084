"""DP configs, accounting and sampling: pure tests, ε checked against dp_accounting directly."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjet.config.privacy import CentralDPConfig, DPConfig, parse_central_dp, parse_dp
from fedjet.errors import ConfigError, DataError, SchemaError
from fedjet.privacy.accounting import PrivacyLedger, calibrate_noise, epsilon_for, privacy_report
from fedjet.privacy.sampling import poisson_batch, record_windows, sample_rate_for
from fedjet.privacy.secure_random import SecureRandom


def library_epsilon(q: float, sigma: float, steps: int, delta: float, accountant: str) -> float:
    """ε straight from dp_accounting, built here without any fedjet code."""
    fresh = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    fresh.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(fresh.get_epsilon(delta))


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [(0.01, 1.0, 100, 1e-5), (0.05, 0.7, 40, 1e-6), (1.0, 5.0, 3, 1e-5), (0.002, 0.5, 1000, 1e-5)],
)
def test_rdp_epsilon_equals_dp_accounting_for_the_same_parameters(q: float, sigma: float, steps: int, delta: float):
    assert epsilon_for(sigma, q, steps, delta, "rdp") == pytest.approx(library_epsilon(q, sigma, steps, delta, "rdp"))


def test_pld_epsilon_equals_dp_accounting_for_the_same_parameters():
    assert epsilon_for(0.9, 0.05, 20, 1e-5, "pld") == pytest.approx(library_epsilon(0.05, 0.9, 20, 1e-5, "pld"))


def test_epsilon_is_zero_without_steps_and_infinite_without_noise():
    assert epsilon_for(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon_for(0.0, 0.1, 5, 1e-5) == float("inf")


@pytest.mark.parametrize("target", [0.5, 1.0, 4.0, 8.0, 30.0])
def test_calibrated_noise_meets_the_target_epsilon_tightly(target: float):
    q, steps, delta = 0.02, 60, 1e-5
    sigma = calibrate_noise(target, q, steps, delta)
    reached = library_epsilon(q, sigma, steps, delta, "rdp")
    assert reached <= target
    assert reached >= 0.99 * target


def test_calibrated_noise_meets_the_target_with_pld():
    sigma = calibrate_noise(4.0, 0.1, 10, 1e-5, "pld")
    reached = library_epsilon(0.1, sigma, 10, 1e-5, "pld")
    assert 0.99 * 4.0 <= reached <= 4.0


def test_calibration_refuses_nonsense():
    with pytest.raises(ConfigError, match="at least one planned step"):
        calibrate_noise(8.0, 0.1, 0, 1e-5)
    with pytest.raises(ConfigError, match="sample rate"):
        calibrate_noise(8.0, 0.0, 10, 1e-5)
    with pytest.raises(ConfigError, match="target epsilon"):
        calibrate_noise(float("inf"), 0.1, 10, 1e-5)


def test_ledger_refuses_steps_beyond_the_budget():
    q, steps_per_update, budget = 0.02, 50, 2.0
    sigma = calibrate_noise(budget, q, 3 * steps_per_update, 1e-5)
    ledger = PrivacyLedger(sample_rate=q, noise_multiplier=sigma, delta=1e-5)
    for _ in range(3):  # exactly the planned updates fit
        assert ledger.can_afford(steps_per_update, budget)
        ledger = ledger.spend(steps_per_update)
    assert ledger.steps_spent == 150
    assert ledger.epsilon_spent() <= budget
    assert not ledger.can_afford(steps_per_update, budget)
    assert not ledger.can_afford(1, budget)
    assert ledger.can_afford(0, budget)
    assert ledger.epsilon_after(1) > ledger.epsilon_spent()


def test_privacy_report_lets_anyone_recompute_each_clouds_epsilon():
    base = PrivacyLedger(sample_rate=0.05, noise_multiplier=1.1, delta=1e-5)
    report = privacy_report({"aws": base.spend(40), "gcp": base.spend(25)}, clip=1.0)
    assert set(report) == {"accountant", "delta", "noise_multiplier", "sample_rate", "clip", "steps", "epsilon"}
    assert report["accountant"] == "rdp" and report["noise_multiplier"] == 1.1 and report["sample_rate"] == 0.05
    assert report["steps"] == {"aws": 40, "gcp": 25}
    for cloud, eps in report["epsilon"].items():
        steps = report["steps"][cloud]
        assert eps == pytest.approx(
            library_epsilon(report["sample_rate"], report["noise_multiplier"], steps, 1e-5, "rdp")
        )


def test_privacy_report_keeps_per_cloud_sample_rates_apart():
    clouds = {
        "a": PrivacyLedger(sample_rate=0.05, noise_multiplier=1.0, delta=1e-5, steps_spent=10),
        "b": PrivacyLedger(sample_rate=0.02, noise_multiplier=1.0, delta=1e-5, steps_spent=10),
    }
    report = privacy_report(clouds, clip=0.5)
    assert report["sample_rate"] == {"a": 0.05, "b": 0.02}
    assert report["noise_multiplier"] == 1.0
    with pytest.raises(ConfigError, match="different accountant or delta"):
        privacy_report({**clouds, "c": PrivacyLedger(sample_rate=0.1, noise_multiplier=1, delta=1e-6)}, clip=1)


def test_parse_dp_reads_both_forms_of_the_flag():
    assert parse_dp("epsilon=8,delta=1e-5,clip=1.0") == DPConfig(epsilon=8.0, delta=1e-5, clip=1.0, noise=None)
    cfg = parse_dp(" noise=1.1 , delta=1e-6, clip=0.5, accountant=PLD")
    assert cfg == DPConfig(epsilon=None, delta=1e-6, clip=0.5, noise=1.1, accountant="pld")
    assert DPConfig.from_wire(cfg.to_wire()) == cfg
    assert DPConfig.from_wire({**cfg.to_wire(), "future_field": 1}) == cfg


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("epsilon=8,delta=1e-5,clip=1,sigma=2", r"unknown key\(s\) \['sigma'\]"),
        ("epsilon=eight,delta=1e-5,clip=1", "epsilon='eight' is not a number"),
        ("epsilon=8,delta=1e-5", r"missing \['clip'\]"),
        ("epsilon=8,noise=1,delta=1e-5,clip=1", "exactly one of epsilon= or noise="),
        ("delta=1e-5,clip=1", "exactly one of epsilon= or noise="),
        ("epsilon=8,delta=1.5,clip=1", "delta must lie strictly between 0 and 1"),
        ("epsilon=8,delta=1e-5,clip=0", "clip must be a finite number > 0"),
        ("epsilon=-1,delta=1e-5,clip=1", "epsilon must be a finite number > 0"),
        ("epsilon=nan,delta=1e-5,clip=1", "epsilon must be a finite number > 0"),
        ("noise=0,delta=1e-5,clip=1", "noise multiplier must be a finite number > 0"),
        ("epsilon=8,delta=1e-5,clip=1,accountant=moments", "accountant must be one of"),
        ("epsilon=8,epsilon=4,delta=1e-5,clip=1", "epsilon given twice"),
        ("epsilon 8,delta=1e-5,clip=1", "expected key=value pairs"),
        ("", "expected key=value pairs"),
    ],
)
def test_parse_dp_explains_what_is_wrong(flag: str, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_dp(flag)


def test_dp_config_from_a_broken_wire_dict_is_a_schema_error():
    with pytest.raises(SchemaError, match="'clip' must be a number"):
        DPConfig.from_wire({"epsilon": 8, "delta": 1e-5})
    with pytest.raises(SchemaError, match="'delta' must be a number"):
        DPConfig.from_wire({"epsilon": 8, "delta": "1e-5", "clip": 1})


def test_parse_central_dp():
    cfg = parse_central_dp("clip=0.1,noise=1.2")
    assert cfg == CentralDPConfig(clip=0.1, noise=1.2)
    assert CentralDPConfig.from_wire(cfg.to_wire()) == cfg
    with pytest.raises(ConfigError, match=r"--central-dp: missing \['noise'\]"):
        parse_central_dp("clip=0.1")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epsilon'\]"):
        parse_central_dp("clip=0.1,noise=1,epsilon=3")
    with pytest.raises(ConfigError, match="noise multiplier must be"):
        parse_central_dp("clip=0.1,noise=0")


def test_poisson_batches_include_each_record_independently():
    rng = SecureRandom()
    sizes = [len(poisson_batch(rng, 1000, 0.03)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(30, rel=0.05)
    assert np.std(sizes) == pytest.approx(np.sqrt(1000 * 0.03 * 0.97), rel=0.15)
    assert len(set(sizes)) > 10
    empties = sum(len(poisson_batch(rng, 5, 0.01)) == 0 for _ in range(200))
    assert empties > 150  # an empty batch is a legal draw
    batch = poisson_batch(rng, 50, 0.5)
    assert batch.dtype.kind == "i" and np.all(np.diff(batch) > 0)


def test_records_are_disjoint_windows_and_q_matches_the_expected_batch():
    tokens = np.arange(25)
    records = record_windows(tokens, 4)
    assert records.shape == (5, 5) and records.dtype == np.int64
    assert records.ravel().tolist() == list(range(25))
    assert sample_rate_for(2, 5) == 0.4
    with pytest.raises(ConfigError, match="expected batch"):
        sample_rate_for(6, 5)
    with pytest.raises(DataError, match="fewer than one record"):
        record_windows(np.arange(3), 4)
