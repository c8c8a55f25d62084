"""``fedjet status`` as the observer of a generated topology: NKEY, TLS and the hub's JetStream domain.

The hub here is one node (the permissions are the same on three); the coordinator's side is
played by the real channel code over its own credentials, so the observer reads exactly what a
coordinator writes, through what the server lets an observer do.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
import torch

from fedjet.broker.auth import ClientAuth
from fedjet.broker.connect import connect_job, server_list
from fedjet.broker.jetstream import close_quietly, ensure_job_streams
from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalPublisher
from fedjet.channel.kv import publish_spec, put_stats, read_spec
from fedjet.codecs.crypto import COORDINATOR
from fedjet.codecs.record import ContributionRecord, Progress, VersionRecord
from fedjet.codecs.tensors import weights_hash
from fedjet.config.job import JobConfig
from fedjet.deploy import Topology, TopologyConfig, generate
from fedjet.deploy.files import write_secret
from fedjet.deploy.identities import new_user_seed
from fedjet.errors import BrokerError
from fedjet.keystore import coordinator_boxes
from fedjet.keystore import generate as generate_keys
from fedjet.observe.status import job_status, status_boxes
from fedjet.spec import JobSpec

JOB = "obs"
CLOUDS = ("aws", "gcp")
SUBJECTS = JobSubjects(JOB)


def free_base_port(count: int) -> int:
    for _ in range(50):
        base = random.randrange(20000, 60000 - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError("no free run of loopback ports")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Topology]:
    """A one-node TLS hub of a generated topology, stopped by PID afterwards."""
    config = TopologyConfig(
        clouds=CLOUDS, job=JOB, out=tmp_path / "deploy", hub_size=1, base_port=free_base_port(3 + len(CLOUDS))
    )
    topology = generate(config)
    server = next(s for s in topology.servers if s.role == "hub")
    with (tmp_path / "hub.log").open("wb") as log:
        proc = subprocess.Popen(
            [find_nats_server(), "-c", str(server.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        port = int(server.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp_path / "hub.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            assert time.monotonic() < deadline, "hub is not listening"
            time.sleep(0.05)
        yield topology
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def coordinator_writes_two_versions(topology: Topology, keys: Path) -> None:
    """Streams, spec, stats and versions 0 and 1 (final), as the coordinator identity writes them."""
    boxes = coordinator_boxes(keys, [*CLOUDS, "eval"])
    nc, js = await connect_job(
        topology.urls_for(COORDINATOR), "coordinator", topology.client_auth(COORDINATOR), topology.jetstream_domain
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # JetStream on a fresh hub takes a moment
            try:
                await ensure_job_streams(js, SUBJECTS)
                break
            except (nats.errors.Error, nats.js.errors.Error) as e:
                assert time.monotonic() < deadline, f"JetStream did not come up: {e}"
                await asyncio.sleep(0.25)
        spec = JobSpec(config=JobConfig(job=JOB, clouds=CLOUDS, observers=("eval",)), model_config={})
        await publish_spec(js, SUBJECTS, spec, boxes.me)
        publisher = GlobalPublisher(
            js, SUBJECTS, boxes, [COORDINATOR, *CLOUDS, "eval"], max_payload=nc.max_payload, snapshot_every=8
        )
        weights = {"w": torch.zeros(4, 4)}
        await publisher.publish(0, weights_hash(weights), weights, VersionRecord(strategy="fedavg"), final=False)
        contributions = tuple(
            ContributionRecord(cloud=c, seq=1, stream_seq=i + 1, base=0, staleness=0, samples=8, loss=2.0)
            for i, c in enumerate(CLOUDS)
        )
        record = VersionRecord(
            strategy="fedavg",
            contributions=contributions,
            rejected_total=1,
            progress=Progress(applied_total=2, applied_through=2, rejected={"ReplayError": 1}),
        )
        weights = {"w": torch.ones(4, 4)}
        await publisher.publish(1, weights_hash(weights), weights, record, final=True)
        for cloud in CLOUDS:
            await put_stats(js, SUBJECTS, cloud, {"updates_sent": 1, "bytes_up": 100})
    finally:
        await close_quietly(nc)


def test_observer_reads_status_over_tls_with_its_nkey_through_the_hub_domain(hub, tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys, [*CLOUDS, "eval"])

    async def scenario():
        await coordinator_writes_two_versions(hub, keys)
        nc, js = await connect_job(hub.urls_for("eval"), "status", hub.client_auth("eval"), hub.jetstream_domain)
        try:
            boxes = status_boxes(keys, "eval")
            spec = await read_spec(js, SUBJECTS, boxes.public_of(COORDINATOR))  # put through the domain API
            assert spec is not None and spec.clouds == CLOUDS
            return await job_status(js, SUBJECTS, boxes)
        finally:
            await close_quietly(nc)

    status = asyncio.run(scenario())
    assert status.head is not None and (status.head.version, status.head.final) == (1, True)
    assert status.record is not None and status.record.applied_total == 2
    assert status.record.rejected == {"ReplayError": 1}
    assert {c.cloud: (c.last_version, c.behind, c.stats.get("updates_sent")) for c in status.clouds} == {
        "aws": (1, 0, 1),
        "gcp": (1, 0, 1),
    }
    assert status.updates is not None and status.updates.messages == 0
    assert not status.notes


def test_connect_job_without_the_ca_fails_fast_as_a_broker_error(hub):
    async def scenario():
        await connect_job(hub.urls_for("eval"), "status", None, hub.jetstream_domain, timeout=2, reconnects=1)

    started = time.monotonic()
    with pytest.raises(BrokerError, match="refused: SSLCertVerificationError"):
        asyncio.run(scenario())
    assert time.monotonic() - started < 15


def test_connect_job_with_an_unknown_nkey_is_refused_by_the_server_at_once(hub, tmp_path):
    seed = write_secret(tmp_path / "stranger" / "user.nk", new_user_seed() + b"\n")
    stranger = ClientAuth(nkey=str(seed), tls_ca=str(hub.ca))

    async def scenario():
        await connect_job(hub.urls_for("eval"), "status", stranger, hub.jetstream_domain, timeout=2)

    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"refused: .*Authorization Violation"):
        asyncio.run(scenario())
    assert time.monotonic() - started < 15  # not the minute of reconnects a network error gets


def test_server_list_takes_one_url_a_comma_list_or_a_sequence():
    assert server_list("nats://a:1") == ["nats://a:1"]
    assert server_list("tls://a:1, tls://b:2") == ["tls://a:1", "tls://b:2"]
    assert server_list(("tls://a:1", "tls://b:2")) == ["tls://a:1", "tls://b:2"]
