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
from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
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
    resumed = sum(p.read_text().count('"coordinator_resumed"') for p in (out / "logs").glob("coordinator-*.log"))
    assert resumed >= 1, "no restarted coordinator resumed the job"
    assert wait_until_gone(processes_tagged(tag), timeout=10) == []
