"""``fedjet status`` against a real nats-server and the real coordinator, driven by hand-made updates."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.kv import put_stats
from fedjet.codecs.crypto import COORDINATOR, Boxes
from fedjet.config.job import JobConfig, StopConfig, TrainConfig
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.errors import ConfigError
from fedjet.keystore import coordinator_boxes, generate, member_boxes
from fedjet.observe.status import JobStatus, job_status, status_boxes, status_command
from fedjet.observe.status_view import render_status
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, sealed_update, until_version

JOB = "st"
CLOUDS = ("aws", "gcp")
SUBJECTS = JobSubjects(JOB)
STATS = {
    "aws": {"updates_sent": 2, "bytes_up": 4000, "bytes_down": 9000, "tokens_per_s": 1500.0, "idle_frac": 0.25},
    "gcp": {"updates_sent": 2, "bytes_up": 4100, "bytes_down": 9100, "tokens_per_s": 900.0, "idle_frac": 0.5},
}


def job_update(boxes: Boxes, cloud: str, seq: int, base: int, value: float) -> bytes:
    return sealed_update(boxes, JOB, cloud, seq, base, value=value, codec="topk:0.5+int8", samples=10)


async def run_tiny_job(nats_url: str, keys: Path) -> int:
    """Two synchronous rounds of aws + gcp, one junk message; returns the update stream's message count."""
    job = JobConfig(
        job=JOB, clouds=CLOUDS, observers=("eval",), codec="topk:0.5+int8",
        train=TrainConfig(local_steps=1), stop=StopConfig(rounds=2),
    )  # fmt: skip
    coordinator = Coordinator(
        CoordinatorConfig(
            nats_url=nats_url,
            spec=JobSpec(config=job, model_config={}),
            boxes=coordinator_boxes(keys, [*CLOUDS, "eval"]),
            idle_timeout_s=30,
        )
    )
    members = {c: member_boxes(keys, c) for c in CLOUDS}
    nc = await connect(nats_url, "hand-made-workers")
    try:
        js = nc.jetstream()
        task = asyncio.create_task(coordinator.run(dict(WEIGHTS)))
        await asyncio.wait_for(coordinator.serving.wait(), 30)
        published = 1
        await js.publish(SUBJECTS.update("aws"), b"no chunk headers at all")  # rejected: BlobError
        for base in (0, 1):
            await until_version(coordinator, base)
            for i, cloud in enumerate(CLOUDS):
                data = job_update(members[cloud], cloud, 10 + base, base, 0.1 * (i + 1))
                blob = await publish_blob(
                    js, SUBJECTS.update(cloud), data, blob_id=f"{cloud}-{base}", max_payload=nc.max_payload
                )
                published += blob.last_seq - blob.first_seq + 1
        await asyncio.wait_for(task, 60)
        for cloud in CLOUDS:
            await put_stats(js, SUBJECTS, cloud, STATS[cloud])
    finally:
        await close_quietly(nc)
    return published


@pytest.fixture
def recorded(nats_url, tmp_path) -> tuple[str, Path, int]:
    keys = tmp_path / "keys"
    generate(keys, [*CLOUDS, "eval"])
    messages = asyncio.run(run_tiny_job(nats_url, keys))
    return nats_url, keys, messages


async def read_status(url: str, boxes: Boxes | None) -> JobStatus:
    nc = await connect(url, "status-test")
    try:
        return await job_status(nc.jetstream(), SUBJECTS, boxes)
    finally:
        await close_quietly(nc)


def test_status_with_the_coordinators_key_shows_version_counts_and_each_clouds_last_update(recorded):
    url, keys, messages = recorded
    status = asyncio.run(read_status(url, status_boxes(keys)))
    assert status.head is not None and status.head.version == 2 and status.head.final
    assert status.record is not None
    assert status.record.applied_total == 4 and status.record.strategy == "fedavg"
    assert status.record.rejected == {"BlobError": 1} and status.record.rejected_total == 1
    assert status.record.versions_read == 3  # v2, v1, v0: the whole chain is shorter than the depth
    assert status.updates is not None and status.updates.messages == messages
    assert status.globals is not None and status.globals.messages >= 6  # a head and its data per version
    by_cloud = {c.cloud: c for c in status.clouds}
    assert list(by_cloud) == list(CLOUDS)
    for cloud in CLOUDS:
        c = by_cloud[cloud]
        assert (c.last_version, c.staleness, c.behind, c.applied) == (2, 0, 0, 2)
        assert c.stats["bytes_up"] == STATS[cloud]["bytes_up"]
    assert not status.notes


def test_status_with_a_members_key_opens_the_records_too(recorded):
    url, keys, _ = recorded
    status = asyncio.run(read_status(url, status_boxes(keys, "eval")))
    assert status.record is not None and status.record.applied_total == 4


def test_status_without_secret_keys_shows_only_what_is_public(recorded, tmp_path):
    url, keys, messages = recorded
    public_only = tmp_path / "public"
    public_only.mkdir()
    (public_only / "coordinator.pub").write_bytes((keys / "coordinator.pub").read_bytes())
    status = asyncio.run(read_status(url, status_boxes(public_only)))
    assert status.head is not None and status.head.version == 2  # verified with coordinator.pub
    assert status.record is None and any("not sealed to" in note for note in status.notes)
    assert {c.cloud: c.last_version for c in status.clouds} == {"aws": None, "gcp": None}

    bare = asyncio.run(read_status(url, None))
    assert bare.head is None and bare.record is None
    assert bare.updates is not None and bare.updates.messages == messages
    assert {c.cloud: c.stats["updates_sent"] for c in bare.clouds} == {"aws": 2, "gcp": 2}  # from KV keys


def test_status_of_a_job_that_does_not_exist_is_empty_not_an_error(nats_url, tmp_path):
    keys = tmp_path / "keys"
    generate(keys, CLOUDS)
    status = asyncio.run(read_status(nats_url, status_boxes(keys)))
    assert status.updates is None and status.globals is None and status.head is None and status.clouds == ()


def test_status_json_is_one_object_with_the_documented_shape(recorded, capsys):
    url, keys, _ = recorded
    with capture_logs():  # the CLI logs to stderr; here keep stdout for the JSON alone
        assert asyncio.run(status_command(url, JOB, str(keys), None, True)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    body = json.loads(lines[0])
    assert set(body) == {"job", "updates", "globals", "head", "record", "clouds", "notes"}
    assert body["head"]["version"] == 2 and body["record"]["rejected"] == {"BlobError": 1}
    assert set(body["clouds"]) == set(CLOUDS)
    assert set(body["clouds"]["aws"]) == {"last_version", "staleness", "behind", "applied", "stats", "link"}
    assert set(body["updates"]) == {"name", "messages", "bytes", "first_seq", "last_seq"}


def test_status_reads_a_stopped_store_and_its_keys(recorded, nats_server, tmp_path, capsys):
    _, keys, _ = recorded
    nats_server.stop()  # a store is read by a fresh server only once its own server is gone
    store = tmp_path / "js"
    (store / "keys").mkdir()
    for name in ("coordinator.key", "coordinator.pub"):
        (store / "keys" / name).write_bytes((keys / name).read_bytes())
        (store / "keys" / name).chmod(0o600)
    with capture_logs():
        assert asyncio.run(status_command(None, None, None, str(store), True)) == 0  # the only job, STORE/keys
    body = json.loads(capsys.readouterr().out)
    assert body["job"] == JOB and body["record"]["applied_total"] == 4


def test_status_table_names_every_cloud_and_the_version(recorded):
    from rich.console import Console

    url, keys, _ = recorded
    status = asyncio.run(read_status(url, status_boxes(keys)))
    console = Console(width=160, record=True, force_terminal=False)
    console.print(render_status(status))
    text = console.export_text()
    assert f"job {JOB}: version 2, final" in text
    assert "aws" in text and "gcp" in text and "1,500" in text and "25%" in text
    assert "fedavg: 4 applied, 1 rejected (BlobError 1)" in text


def test_status_command_refuses_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        asyncio.run(status_command(None, None, None, None, False))
    with pytest.raises(ConfigError, match="no JetStream store"):
        asyncio.run(status_command(None, None, None, str(tmp_path), False))
    with pytest.raises(ConfigError, match="neither"):
        status_boxes(tmp_path)
    assert status_boxes(None) is None
    keys = tmp_path / "keys"
    generate(keys, CLOUDS)
    assert status_boxes(keys).me.name == COORDINATOR
    assert status_boxes(keys, "gcp").me.name == "gcp"
