"""Replay recorded rounds out of JetStream: bit-for-bit verification, tampering, counterfactuals."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid

import pytest

from fedjet.broker.blobs import H_BLOB
from fedjet.broker.jetstream import close_quietly, connect, read_range
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from tests.conftest import run_fedjet

pytestmark = pytest.mark.e2e

FLAGS = ["--local-steps", "4", "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "2048"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, data_dir):
    """A 3-round run recorded with --store (its keys are kept in STORE/keys)."""
    store = tmp_path_factory.mktemp("rec") / "store"
    job = f"rec-{uuid.uuid4().hex[:6]}"
    report = store.parent / "report.json"
    args = ["up", "--job", job, "--rounds", "3", "--codec", "topk:0.05+int8", "--store", str(store)]
    result = run_fedjet(*args, "--data", str(data_dir), "--report", str(report), *FLAGS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (store / "keys" / "coordinator.key").is_file()
    return store, job, json.loads(report.read_text())


def test_replay_verifies_a_recorded_run_bit_for_bit(recorded):
    store, job, _ = recorded
    result = run_fedjet("replay", "--store", str(store), "--job", job, "--verify", "--no-progress", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"versions": 3, "mismatches": 0, "first_mismatch": None}
    ranged = run_fedjet("replay", "--store", str(store), "--verify", "--from-version", "1", "--until-version", "2")
    assert json.loads(ranged.stdout.strip().splitlines()[-1])["versions"] == 1  # the only job is found


def _delete_one_update_of_version_2(store, job) -> int:
    """Play the broker operator: silently drop one chunk of the 4th update (it went into v2)."""

    async def tamper() -> int:
        server = EmbeddedNatsServer(store)
        nc = await connect(server.start(), "tamper")
        try:
            js = nc.jetstream()
            subjects = JobSubjects(job)
            order: list[str] = []
            last_seq: dict[str, int] = {}
            async for msg in read_range(js, subjects.update_stream, subjects.updates):
                blob = msg.headers[H_BLOB]
                if blob not in last_seq:
                    order.append(blob)
                last_seq[blob] = msg.metadata.sequence.stream
            victim = last_seq[order[3]]
            await js.delete_msg(subjects.update_stream, victim)
            return victim
        finally:
            await close_quietly(nc)
            server.stop()

    return asyncio.run(tamper())


def test_verify_finds_the_first_mismatch_at_the_tampered_version(recorded, tmp_path):
    store, job, _ = recorded
    copy = tmp_path / "tampered"
    shutil.copytree(store, copy)
    _delete_one_update_of_version_2(copy, job)
    result = run_fedjet("replay", "--store", str(copy), "--job", job, "--verify", "--no-progress", timeout=120)
    assert result.returncode == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["versions"] == 3 and summary["mismatches"] == 1  # v3 verifies again after resync
    assert summary["first_mismatch"]["version"] == 2
    assert "missing" in summary["first_mismatch"]["reason"]


def test_counterfactual_replay_reports_other_hashes_and_real_eval_numbers(recorded, tmp_path, data_dir):
    store, job, original = recorded
    report_path = tmp_path / "cf.json"
    result = run_fedjet(
        "replay",
        "--store",
        str(store),
        "--job",
        job,
        "--strategy",
        "dynamic",
        "--temperature",
        "0.3",
        "--data",
        str(data_dir),
        "--eval-tokens",
        "2048",
        "--report",
        str(report_path),
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained from the recorded global versions" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["config"]["strategy"] == "dynamic" and report["config"]["recorded_strategy"]["name"] == "fedavg"
    recorded_hashes = [r["hash"] for r in original["rounds"]]
    cf_hashes = [r["hash"] for r in report["rounds"]]
    assert cf_hashes[0] == recorded_hashes[0]  # the same start
    assert not set(cf_hashes[1:]) & set(recorded_hashes[1:])
    assert len(report["rounds"]) == 4 and all(r["eval_loss"] > 0 and 0 <= r["eval_acc"] <= 1 for r in report["rounds"])
    assert report["rounds"][-1]["eval_loss"] < report["rounds"][0]["eval_loss"]
    assert report["rounds"][0]["eval_loss"] == pytest.approx(original["rounds"][0]["eval_loss"], abs=1e-6)


def test_replay_without_keys_or_records_fails_clearly(tmp_path):
    result = run_fedjet("replay", "--store", str(tmp_path), "--verify", timeout=60)
    assert result.returncode == 2 and "JetStream store" in result.stderr


def test_bench_experiment_writes_tables_and_plots(tmp_path, data_dir):
    out = tmp_path / "exp"
    result = run_fedjet(
        "bench",
        "experiment",
        "--out",
        str(out),
        "--strategies",
        "fedavg,fedbuff",
        "--partitions",
        "fixed",
        "--codecs",
        "topk:0.01+int8",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--eval-tokens",
        "2048",
        "--data",
        str(data_dir),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"fedavg/fixed/topk:0.01+int8", "fedbuff/fixed/topk:0.01+int8"}
    for cell in results["cells"].values():
        assert cell["report"]["summary"]["updates_applied"] == 6
    table = (out / "results.md").read_text()
    assert "Table 2" in table and "Table 3" in table and table.count("| fedbuff | fixed |") == 2
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
