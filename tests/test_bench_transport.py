"""``fedjet bench transport`` moves a sealed update through a real nats-server and reports the
ratio to raw publishes measured in the same run (the 400 MB figure lives in the README)."""

from __future__ import annotations

import json

from tests.conftest import run_fedjet


def test_bench_transport_prints_same_run_ratios_and_the_update_arrives_intact():
    result = run_fedjet("bench", "transport", "--mb", "2", "--json", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["intact"] is True and out["mb"] == 2.0
    assert out["mb_s"] > 0 and out["raw_mb_s"] > 0
    assert abs(out["ratio_to_raw"] - out["mb_s"] / out["raw_mb_s"]) < 1e-9
    assert out["peak_rss_mb"] >= out["baseline_rss_mb"] > 0


def test_bench_transport_refuses_a_size_below_one_mb():
    result = run_fedjet("bench", "transport", "--mb", "0", timeout=60)
    assert result.returncode != 0 and "--mb" in result.stderr
