"""End to end: ``fedjet up`` as a user runs it, 3 worker processes over a real JetStream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, processes_tagged, run_fedjet, tagged, wait_until_gone
from tests.twin_runs import FLOAT_ORDER, largest_difference, run_side_by_side

pytestmark = pytest.mark.e2e

SMALL = ["--local-steps", "6", "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "4096"]


def up(tmp_path_factory, data_dir, *flags: str) -> tuple[str, dict, str]:
    """Run ``fedjet up`` with a fresh job name; returns (job, report, stdout). The job name
    also tags the processes it starts (see ``processes_tagged``)."""
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    report_path = tmp_path_factory.mktemp("up") / "report.json"
    args = ("up", "--job", job, "--data", str(data_dir), "--report", str(report_path), *SMALL, *flags)
    result = run_fedjet(*args, env=tagged(job))
    assert result.returncode == 0, result.stdout + result.stderr
    return job, json.loads(report_path.read_text()), result.stdout


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory, data_dir):
    """Two dense jobs with the same seed and data, side by side (the second: a twin to compare)."""
    out = tmp_path_factory.mktemp("dense")
    jobs = [f"e2e-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    flags = ["--data", str(data_dir), *SMALL, "--rounds", "2", "--codec", "dense", "--seed", "0"]
    runs = [["up", "--job", job, "--report", str(out / f"{job}.json"), "--save", str(out / job), *flags]
            for job in jobs]  # fmt: skip
    stdout = run_side_by_side(runs, envs=[tagged(job) for job in jobs])
    return [
        (job, json.loads((out / f"{job}.json").read_text()), text, out / job)
        for job, text in zip(jobs, stdout, strict=True)
    ]


@pytest.fixture(scope="module")
def dense_run(dense_runs):
    job, report, stdout, _ = dense_runs[0]
    return job, report, stdout


def test_two_plain_runs_with_the_same_seed_and_data_export_the_same_model(dense_runs):
    """Without DP, nothing but the seed and the data decides a run (to float summation order:
    a round's updates may arrive in any order); DP runs differ by their noise (test_privacy_job)."""
    (_, first, _, first_model), (_, second, _, second_model) = dense_runs
    assert largest_difference(first_model, second_model) < FLOAT_ORDER
    assert first["summary"]["final_eval_loss"] == pytest.approx(second["summary"]["final_eval_loss"], abs=1e-4)


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, data_dir):
    """The shipped example job.toml, flags overriding its rounds and its codec (topk:0.01+int8)."""
    example = str(REPO / "examples" / "job.toml")
    return up(tmp_path_factory, data_dir, "--config", example, "--rounds", "2", "--codec", "topk:0.01+int8")


def test_three_clouds_two_rounds_lower_eval_loss_and_leave_nothing_running(dense_runs):
    job, report, stdout, model = dense_runs[0]
    assert "training on valid, evaluating on test" in stdout
    rounds = report["rounds"]
    assert [r["version"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert all(len(r["hash"]) == 64 for r in rounds) and len({r["hash"] for r in rounds}) == 3
    assert sorted(rounds[1]["contributors"]) == ["aws", "azure", "gcp"]
    summary = report["summary"]
    assert summary["updates_applied"] == 6 and summary["updates_rejected"] == 0
    clouds = report["clouds"].values()  # every worker's own count: no fallback to the records' figures
    assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in clouds)
    assert summary["bytes_up"] == sum(c["bytes_up"] for c in clouds)
    assert summary["bytes_down"] == sum(c["bytes_down"] for c in clouds)
    for c in clouds:  # a socket carries the payloads and the protocol around them
        assert c["socket_out"] > c["bytes_up"] and c["socket_in"] > c["bytes_down"]
        assert c["idle_frac"] == pytest.approx(1 - c["compute_s"] / c["lifetime_s"])
        assert c["lifetime_s"] > c["compute_s"] + c["wait_s"] and 0 < c["idle_frac"] < 1
        assert 100 < c["peak_rss_mb"] < 64 * 1024 and c["peak_device_mb"] is None  # its own high-water mark; CPU
    assert 0 < summary["peak_up_mb_s"] * 1e6 <= max(c["socket_out"] for c in clouds)  # within what was written
    assert 100 < summary["coordinator_peak_rss_mb"] < 64 * 1024
    by_process = summary["socket_bytes_by_process"]
    assert set(by_process) == {"worker-aws", "worker-gcp", "worker-azure", "coordinator", "observer"}
    assert summary["socket_bytes"] == sum(by_process.values())
    # the coordinator publishes the exact dense version on every version: its socket shows them
    exact = sum(t.numel() * t.element_size() for t in load_file(model / "model.safetensors").values())
    assert by_process["coordinator"] > 2 * exact and by_process["observer"] > 2 * exact
    for key in ("final_eval_loss", "final_eval_ppl", "wall_s"):
        assert summary[key] > 0
    assert set(report["clouds"]) == {"aws", "gcp", "azure"}
    assert all(c["updates_sent"] == 2 for c in report["clouds"].values())
    assert report["config"]["rounds"] == 2 and report["config"]["clouds"] == ["aws", "gcp", "azure"]
    for line in ("round   1", "round   2", "eval_loss", "ppl", "acc"):
        assert line in stdout
    assert wait_until_gone(processes_tagged(job), timeout=10) == []  # its nats-server, coordinator, workers


def test_topk_int8_lowers_loss_with_over_50x_fewer_bytes_up_than_dense(dense_run, topk_run):
    _, dense, _ = dense_run
    _, sparse, _ = topk_run
    assert sparse["config"]["codec"] == "topk:0.01+int8"
    assert sparse["rounds"][-1]["eval_loss"] < sparse["rounds"][0]["eval_loss"]
    assert dense["summary"]["bytes_up"] / sparse["summary"]["bytes_up"] >= 50
    # per-round figures are wire bytes of what was applied, and they add up to the workers' own count
    assert sum(r["bytes_up"] for r in sparse["rounds"]) == sparse["summary"]["bytes_up"]


def test_bad_flags_fail_fast_with_a_clear_message(data_dir):
    result = run_fedjet("up", "--strategy", "fedavg", "--quorum", "7", "--data", str(data_dir), timeout=60)
    assert result.returncode == 2
    assert "--quorum must be in 1..3" in result.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_everything(data_dir, sig, code):
    job = f"sig-{uuid.uuid4().hex[:8]}"
    proc = start_up(job, data_dir)
    try:
        wait_for_round(proc, 1)
        assert len(processes_tagged(job)) >= 5, "the run should be going: up, nats-server, coordinator, workers"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        assert "shut down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_until_gone(processes_tagged(job), timeout=10) == []


def test_sigkilled_up_takes_its_nats_server_coordinator_and_workers_with_it(data_dir):
    """SIGKILL (or the OOM killer) gives `fedjet up` no chance to clean up: the kernel must."""
    job = f"kill-{uuid.uuid4().hex[:8]}"
    proc = start_up(job, data_dir)
    children: list[int] = []
    try:
        wait_for_round(proc, 1)
        children = [pid for pid in processes_tagged(job) if pid != proc.pid]
        assert len(children) >= 4, "nats-server, coordinator and two workers should be running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until_gone(children, timeout=30) == [], "children of a SIGKILLed fedjet up were orphaned"
    finally:
        for pid in wait_until_gone(children, timeout=0):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def start_up(job: str, data_dir) -> subprocess.Popen:
    args = ["up", "--job", job, "--rounds", "50", "--clouds", "aws,gcp", "--data", str(data_dir), *SMALL]
    return subprocess.Popen(
        [sys.executable, "-m", "fedjet", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **tagged(job)},
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """Ctrl-C as a terminal sends it: a harness started in the background (where the shell
    ignores SIGINT, and children inherit that) must not make the test meaningless."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_round(proc: subprocess.Popen, round_: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith(f"round {round_:3d}") or time.monotonic() > deadline:
            return
    raise AssertionError(f"fedjet up ended before round {round_}: {proc.stderr.read()[-2000:]}")
