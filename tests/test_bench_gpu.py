"""bench gpu's ratios are taken against the fastest bare reference of the run."""

from __future__ import annotations

import pytest

from fedjet.bench.gpu import GpuBenchConfig, compared
from fedjet.errors import ConfigError


def test_the_ratio_is_against_the_faster_bare_reference() -> None:
    fed = {"steady_tokens_per_s": 900.0, "run_tokens_per_s": 600.0}
    out = compared(fed, [{"tokens_per_s": 800.0}, {"tokens_per_s": 1000.0}])
    assert out["bare_runs"] == [800.0, 1000.0]
    assert out["bare"]["tokens_per_s"] == 1000.0
    assert out["ratio"] == pytest.approx(0.9)
    assert out["run_ratio"] == pytest.approx(0.6)


def test_no_reference_fails_loudly() -> None:
    with pytest.raises(ValueError):
        compared({"steady_tokens_per_s": 1.0, "run_tokens_per_s": 1.0}, [])
    with pytest.raises(RuntimeError):
        compared({"steady_tokens_per_s": 1.0, "run_tokens_per_s": 1.0}, [{"tokens_per_s": 0.0}])


def test_ranks_measure_one_cloud() -> None:
    with pytest.raises(ConfigError):
        GpuBenchConfig(clouds=2, nproc_per_node=2)
