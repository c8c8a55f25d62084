"""``fedjet up --secure-agg``: three worker processes mask their updates, the coordinator
applies only their sums, the model learns, and ``fedjet replay --verify`` recomputes every sum
from the recorded transcripts; a counterfactual replay is refused (no single update exists).

The run is FedBuff with outer Nesterov (buffers of 2 of 3 clouds, stale updates weighed before
masking), which is also the end-to-end run of FedBuff under a server optimizer: synchronous
secure rounds run through the real service in ``test_secagg_rounds.py``, and plain FedBuff in
``fedjet bench experiment`` (``test_e2e_replay.py``)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import run_fedjet

pytestmark = pytest.mark.e2e

FLAGS = ["--local-steps", "4", "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "2048"]
FEDBUFF = ["--strategy", "fedbuff", "--max-updates", "4", "--buffer-size", "2", "--server-opt", "nesterov",
           "--server-lr", "0.7"]  # fmt: skip


def test_a_secure_fedbuff_run_learns_and_replays_bit_for_bit(tmp_path, data_dir):
    store, report = tmp_path / "store", tmp_path / "report.json"
    job = f"sa-{uuid.uuid4().hex[:6]}"
    args = ["up", "--job", job, *FEDBUFF, "--secure-agg", "threshold=2,timeout=30", "--store", str(store)]
    result = run_fedjet(*args, "--data", str(data_dir), "--report", str(report), *FLAGS)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(report.read_text())
    assert summary["config"]["strategy_config"]["name"] == "fedbuff"
    assert summary["summary"]["updates_applied"] == 4
    assert all(len(r["contributors"]) == 2 for r in summary["rounds"][1:])
    assert summary["summary"]["final_eval_loss"] < summary["summary"]["initial_eval_loss"]

    verified = run_fedjet("replay", "--store", str(store), "--verify", "--no-progress", timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    summary = json.loads(verified.stdout.strip().splitlines()[-1])
    assert summary == {"versions": 2, "mismatches": 0, "first_mismatch": None}

    other = run_fedjet("replay", "--store", str(store), "--strategy", "fedavg", "--report", str(tmp_path / "cf.json"))
    assert other.returncode != 0 and "only ever held each round's sum" in other.stderr
