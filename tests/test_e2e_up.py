"""End to end: ``fedjet up`` as a user runs it, 3 worker processes over a real JetStream."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import processes_matching, run_fedjet

pytestmark = pytest.mark.e2e

SMALL = ["--local-steps", "6", "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "4096"]


def test_three_clouds_two_rounds_lower_eval_loss_and_leave_nothing_running(tmp_path, data_dir):
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    report_path = tmp_path / "report.json"
    result = run_fedjet("up", "--job", job, "--rounds", "2", "--data", str(data_dir), "--report", str(report_path), *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training on valid, evaluating on test" in result.stdout
    report = json.loads(report_path.read_text())
    rounds = report["rounds"]
    assert [r["version"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert all(len(r["hash"]) == 64 for r in rounds) and len({r["hash"] for r in rounds}) == 3
    assert sorted(rounds[1]["contributors"]) == ["aws", "azure", "gcp"]
    summary = report["summary"]
    assert summary["updates_applied"] == 6 and summary["updates_rejected"] == 0
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    for key in ("final_eval_loss", "final_eval_ppl", "wall_s"):
        assert summary[key] > 0
    assert set(report["clouds"]) == {"aws", "gcp", "azure"}
    assert all(c["updates_sent"] == 2 for c in report["clouds"].values())
    assert report["config"]["rounds"] == 2 and report["config"]["clouds"] == ["aws", "gcp", "azure"]
    for line in ("round   1", "round   2", "eval_loss", "ppl", "acc"):
        assert line in result.stdout
    assert processes_matching(job) == []
    assert processes_matching("fedjet-nats-") == []  # the embedded server's config lives there


def test_bad_flags_fail_fast_with_a_clear_message(data_dir):
    result = run_fedjet("up", "--strategy", "fedavg", "--quorum", "7", "--data", str(data_dir), timeout=60)
    assert result.returncode == 2
    assert "--quorum must be in 1..3" in result.stderr
