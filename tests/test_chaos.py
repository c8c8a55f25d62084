"""Chaos in ``make test``: a real job (nats-server, coordinator, three workers, all separate
processes) keeps going while its coordinator is SIGKILLed twice, the nats-server is restarted
and a worker is SIGKILLed, and afterwards nothing is lost, nothing applied twice, and every
version replays to its recorded hash. The long run (``fedjet bench chaos --kills 20``) is in
the README."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fedjet.bench.chaos import ChaosConfig, describe, run
from fedjet.bench.chaos_audit import acknowledged_sends, healthy
from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
from fedjet.errors import ConfigError
from tests.conftest import TAG_ENV, processes_tagged, wait_until_gone


def test_a_publish_waits_for_its_stream_to_come_back(nats_server):
    """Right after a server restart JetStream answers "no responders" until the stream is
    recovered: a worker's update published then is re-sent (dedup ids: stored once)."""
    subjects = JobSubjects("comeback")

    async def scenario() -> tuple[int, int, int]:
        nc = await connect(nats_server.url, "test-publisher")
        js = nc.jetstream()
        try:

            async def stream_later() -> None:
                await asyncio.sleep(0.7)
                await ensure_job_streams(js, subjects)

            later = asyncio.ensure_future(stream_later())
            published = await publish_blob(js, subjects.update("aws"), b"x" * 5000, blob_id="b", max_payload=6144)
            await later
            info = await js.stream_info(subjects.update_stream)
            return published.chunks, published.last_seq, info.state.messages
        finally:
            await close_quietly(nc)

    assert asyncio.run(scenario()) == (2, 2, 2)


@pytest.mark.e2e
@pytest.mark.timeout(480)  # above the harness's own 400 s limit, so the harness reports first
def test_a_few_kills_lose_nothing(tmp_path, data_dir, monkeypatch):
    tag = f"chaos-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(TAG_ENV, tag)  # every process the run starts carries it
    out = tmp_path / "chaos"
    config = ChaosConfig(
        coordinator_kills=2, nats_restarts=1, worker_kills=1, rounds=7, seed=1, data=str(data_dir),
        out=str(out), replay_cli=False, timeout_s=400.0,
    )  # fmt: skip
    result = run(config)
    summary = describe(result)
    assert (result["coordinator_kills"], result["nats_restarts"], result["worker_kills"]) == (2, 1, 1), summary
    assert result["starts"]["coordinator"] == 3 and sum(result["starts"].values()) == 3 + 3 + 1, result["starts"]
    assert not result["crashes"], result["crashes"]
    assert result["final"] and result["versions"] == 7, summary
    assert result["lost"] == result["doubled"] == result["replay_mismatches"] == 0, result
    assert result["applied"] == result["applied_total_recorded"], result
    assert result["applied"] + result["rejected_total"] + result["undecided_at_end"] == result["sent"], result
    assert result["rejected_recounted"] == 0 and result["undecided_at_end"] <= 3, result
    # cross-checked against the workers' own logs: every acknowledged send is in the stream
    assert result["acknowledged"] > 0 and result["acknowledged_missing"] == 0, result
    assert result["unauthenticated"] == 0 and result["partial_blobs"] <= 1 and healthy(result), summary
    resumed = sum(p.read_text().count('"coordinator_resumed"') for p in (out / "logs").glob("coordinator-*.log"))
    assert resumed >= 1, "no restarted coordinator resumed the job"
    assert wait_until_gone(processes_tagged(tag), timeout=10) == []


def test_the_workers_acknowledged_sends_are_read_from_their_logs_and_a_missing_one_is_unhealthy(tmp_path):
    (tmp_path / "worker-aws-1.log").write_text(
        '{"event": "update_sent", "cloud": "aws", "worker": "0", "seq": 17, "bytes": 10}\n'
        '{"event": "broker_retry", "cloud": "aws"}\n'
        '{"event": "update_sent", "cloud": "aws", "worker": "0", "se'  # cut short by a SIGKILL
    )
    (tmp_path / "worker-gcp-1.log").write_text('{"event": "update_sent", "cloud": "gcp", "worker": "0", "seq": 4}\n')
    (tmp_path / "coordinator-1.log").write_text('{"event": "update_sent", "cloud": "x", "worker": "0", "seq": 1}\n')
    assert acknowledged_sends(tmp_path) == {("aws", "0", 17), ("gcp", "0", 4)}
    fine = {
        "final": True, "lost": 0, "doubled": 0, "replay_mismatches": 0, "rejected_recounted": 0,
        "acknowledged_missing": 0, "unauthenticated": 0, "partial_blobs": 1, "worker_kills": 1, "applied": 5,
        "applied_total_recorded": 5, "crashes": [], "forked_versions": 0,
    }  # fmt: skip
    assert healthy(fine)
    assert not healthy(fine | {"acknowledged_missing": 1})  # the broker lost an acknowledged update
    assert not healthy(fine | {"unauthenticated": 1})  # something nobody signed reached the stream
    assert not healthy(fine | {"partial_blobs": 2})  # more partial blobs than killed workers


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_a_fragment_job_loses_nothing_when_a_worker_and_the_coordinator_are_killed(tmp_path, data_dir, monkeypatch):
    """``--fragments 2``: a worker SIGKILLed mid-fragment and restarted, the coordinator killed
    once; every update is applied once or rejected with a reason, and every version replays."""
    tag = f"chaos-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(TAG_ENV, tag)
    config = ChaosConfig(
        coordinator_kills=1, nats_restarts=0, worker_kills=1, rounds=6, seed=2, data=str(data_dir),
        out=str(tmp_path / "chaos"), replay_cli=False, timeout_s=400.0, local_steps=4, codec="dense",
        job_flags=("--fragments", "2"),
    )  # fmt: skip
    result = run(config)
    summary = describe(result)
    assert (result["coordinator_kills"], result["worker_kills"]) == (1, 1), summary
    assert not result["crashes"] and result["final"] and result["versions"] == 6, summary
    assert result["lost"] == result["doubled"] == result["replay_mismatches"] == 0, result
    assert result["acknowledged"] > 0 and result["acknowledged_missing"] == 0 and healthy(result), summary
    assert wait_until_gone(processes_tagged(tag), timeout=10) == []


def test_a_worker_whose_rank_is_killed_stops_cleanly_and_its_restart_resumes(tmp_path, data_dir, monkeypatch):
    """Clouds of two ranks; one cloud's extra rank is SIGKILLed mid-job: its worker stops on its
    own, naming the lost rank, and the restarted worker resumes: no update lost or doubled (by
    the records and by the workers' acknowledged sends), every version replays, nothing else
    crashed and nothing is left running."""
    tag = f"chaos-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(TAG_ENV, tag)
    config = ChaosConfig(
        coordinator_kills=0, nats_restarts=0, worker_kills=0, rank_kills=1, rounds=5, seed=3, data=str(data_dir),
        out=str(tmp_path / "chaos"), replay_cli=False, timeout_s=400.0, local_steps=2, codec="dense",
        clouds=("aws", "gcp"), worker_flags=("--nproc-per-node", "2"),
    )  # fmt: skip
    result = run(config)
    summary = describe(result)
    assert result["rank_kills"] == result["rank_lost_exits"] == 1, summary
    assert sum(result["starts"].values()) == 1 + 2 + 1, result["starts"]  # the one worker restarted, once
    assert not result["crashes"] and result["final"] and result["versions"] == 5, summary
    assert result["lost"] == result["doubled"] == result["replay_mismatches"] == 0, result
    assert result["applied"] == result["applied_total_recorded"] and result["applied"] >= 5 * 2, result
    assert result["acknowledged"] > 0 and result["acknowledged_missing"] == 0 and healthy(result), summary
    assert wait_until_gone(processes_tagged(tag), timeout=10) == []


def test_rank_kills_need_workers_of_several_ranks():
    with pytest.raises(ConfigError, match="several ranks"):
        ChaosConfig(rank_kills=1)
    with pytest.raises(ConfigError, match="several ranks"):
        ChaosConfig(rank_kills=1, worker_flags=("--nproc-per-node", "1"))
    assert ChaosConfig(rank_kills=1, worker_flags=("--nproc-per-node=2",)).counts["rank"] == 1
