"""The generated topology on real servers: a 3-node TLS hub with JetStream and a leaf node per cloud.

Every refusal asserted here comes from nats-server itself (its error text, its log), never from a
check inside fedjet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import api

from fedjet.broker.auth import ClientAuth
from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import JobSubjects, kv_put_subject
from fedjet.deploy import Topology, TopologyConfig, generate
from fedjet.deploy.files import write_secret
from fedjet.deploy.identities import new_user_seed
from tests.conftest import until

JOB = "j"
CLOUDS = ("aws", "gcp", "azure")
SUBJECTS = JobSubjects(JOB)
KV_STREAM = f"KV_{SUBJECTS.kv_bucket}"
GLOBAL_CHUNKS, CHUNK_BYTES = 16, 900_000


def _free_base_port(count: int, attempts: int = 50) -> int:
    """A base port whose ``count`` successors are all free on loopback right now."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000 - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no run of {count} free loopback ports found")


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass
class Cluster:
    """The running servers of one generated topology, stopped by PID."""

    topology: Topology
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        server = next(s for s in self.topology.servers if s.name == name)
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [find_nats_server(), "-c", str(server.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for server in self.topology.servers:
            while True:
                proc = self.procs[server.name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited: {self.log(server.name)[-2000:]}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", _port_of(server.url)), 0.5):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} is not listening: {self.log(server.name)[-2000:]}")
                time.sleep(0.05)


@dataclass
class Session:
    """One client connection and the asynchronous errors the server sent it."""

    nc: Client
    errors: list[str]

    def js(self, topology: Topology) -> Any:
        return self.nc.jetstream(domain=topology.jetstream_domain, timeout=3.0)


@contextlib.asynccontextmanager
async def session(topology: Topology, identity: str) -> AsyncIterator[Session]:
    """``identity`` connected where the topology says it connects (its leaf, or the hub)."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(
        topology.urls_for(identity),
        error_cb=on_error,
        connect_timeout=3,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=50,
        **topology.client_auth(identity).connect_kwargs(),
    )
    try:
        yield Session(nc, errors)
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()


async def _retry(action: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await action()
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not succeed within {timeout}s: {type(e).__name__}: {e}") from e
            await asyncio.sleep(0.25)


async def _set_up_job(topology: Topology) -> None:
    """What the coordinator does first: R3 streams, the KV bucket, the spec, one global version."""
    common = {"storage": api.StorageType.FILE, "allow_direct": True, "num_replicas": topology.replicas}
    async with session(topology, "coordinator") as co:
        js = co.nc.jetstream(timeout=5.0)
        await _retry(js.account_info, 20, "JetStream on the hub")
        await _retry(
            lambda: js.add_stream(api.StreamConfig(name=SUBJECTS.update_stream, subjects=[SUBJECTS.updates], **common)),
            20,
            "creating the updates stream",
        )
        global_subjects = [SUBJECTS.global_head, SUBJECTS.global_data]
        await js.add_stream(api.StreamConfig(name=SUBJECTS.global_stream, subjects=global_subjects, **common))
        kv = await js.create_key_value(
            api.KeyValueConfig(bucket=SUBJECTS.kv_bucket, history=1, replicas=topology.replicas)
        )
        await kv.put("spec", b"the job spec")
        await js.publish(SUBJECTS.global_head, b"global version 1")
        for i in range(GLOBAL_CHUNKS):  # weights: enough bytes that an ordered consumer needs flow control
            await js.publish(SUBJECTS.global_data, bytes([i]) * CHUNK_BYTES)
        assert co.errors == []


async def _wait_leaves(topology: Topology) -> None:
    """A leaf is ready once its cloud reaches the hub's JetStream through it."""
    for cloud in topology.leaf:
        async with session(topology, cloud) as s:
            await _retry(s.js(topology).account_info, 20, f"JetStream through leaf-{cloud}")


@contextlib.contextmanager
def running(config: TopologyConfig, logs: Path, edit: Callable[[Topology], None] | None = None) -> Iterator[Cluster]:
    """Generate ``config``, start every server, and stop them all (by PID) whatever happens."""
    topology = generate(config)
    if edit is not None:
        edit(topology)
    cluster = Cluster(topology=topology, logs=logs)
    try:
        for server in topology.servers:
            cluster.start(server.name)
        cluster.wait_listening()
        yield cluster
    finally:
        pids = [proc.pid for proc in cluster.procs.values()]
        cluster.stop_all()
        for pid in pids:  # nothing of ours is left running
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def _config(out: Path, clouds: tuple[str, ...], **options: Any) -> TopologyConfig:
    hub_size = options.get("hub_size", 3)
    base_port = _free_base_port(3 * hub_size + len(clouds))
    return TopologyConfig(clouds=clouds, job=JOB, out=out / "deploy", base_port=base_port, **options)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    out = tmp_path_factory.mktemp("topology")
    with running(_config(out, CLOUDS), out) as cluster:
        asyncio.run(_set_up_job(cluster.topology))
        asyncio.run(_wait_leaves(cluster.topology))
        yield cluster


def test_coordinator_on_the_hub_holds_r3_streams_and_the_kv_bucket(cluster):
    async def scenario():
        async with session(cluster.topology, "coordinator") as co:
            js = co.js(cluster.topology)
            infos = [await js.stream_info(name) for name in (SUBJECTS.update_stream, SUBJECTS.global_stream, KV_STREAM)]
            spec = await (await js.key_value(SUBJECTS.kv_bucket)).get("spec")
            return infos, spec.value

    infos, spec = asyncio.run(scenario())
    assert [info.config.num_replicas for info in infos] == [3, 3, 3]
    assert all(len(info.cluster.replicas or []) == 2 for info in infos)  # a leader and two followers
    assert infos[1].state.messages == 1 + GLOBAL_CHUNKS
    assert spec == b"the job spec"


def test_cloud_on_its_leaf_publishes_its_update_and_reads_globals_and_spec(cluster):
    topology = cluster.topology

    async def scenario():
        async with session(topology, "aws") as aws:
            js = aws.js(topology)
            ack = await js.publish(SUBJECTS.update("aws"), b"aws update", headers={"Nats-Msg-Id": "aws/0/1"})
            received: asyncio.Queue[Any] = asyncio.Queue()
            sub = await js.subscribe(
                SUBJECTS.global_head,
                cb=received.put,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                stream=SUBJECTS.global_stream,
            )
            first = await asyncio.wait_for(received.get(), 5)
            await sub.unsubscribe()
            chunks: asyncio.Queue[Any] = asyncio.Queue()
            sub = await js.subscribe(
                SUBJECTS.global_data,
                cb=chunks.put,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                stream=SUBJECTS.global_stream,
            )
            weights = [(await asyncio.wait_for(chunks.get(), 10)).data for _ in range(GLOBAL_CHUNKS)]
            await sub.unsubscribe()
            direct = await js.get_msg(SUBJECTS.global_stream, seq=first.metadata.sequence.stream, direct=True)
            spec = await (await js.key_value(SUBJECTS.kv_bucket)).get("spec")
            stats_ack = await js.publish(
                kv_put_subject(SUBJECTS.kv_bucket, "stats.aws", topology.jetstream_domain), b"{}"
            )
            return ack, first.data, direct.data, spec.value, stats_ack, weights, aws.errors

    ack, first, direct, spec, stats_ack, weights, errors = asyncio.run(scenario())
    assert weights == [bytes([i]) * CHUNK_BYTES for i in range(GLOBAL_CHUNKS)]
    assert ack.stream == SUBJECTS.update_stream and ack.domain == topology.jetstream_domain
    assert first == direct == b"global version 1"
    assert spec == b"the job spec"
    assert stats_ack.stream == KV_STREAM
    assert errors == []


def test_cloud_publishing_another_clouds_update_is_refused_by_the_server(cluster):
    topology = cluster.topology

    async def scenario():
        async with session(topology, "aws") as aws:
            await aws.nc.publish(SUBJECTS.update("gcp"), b"forged")
            await aws.nc.flush()
            with pytest.raises(nats.errors.TimeoutError):  # no PubAck: the message never reached the stream
                await aws.js(topology).publish(SUBJECTS.update("gcp"), b"forged", timeout=1.0)
            await until(lambda: aws.errors, "the server's permissions violation", timeout=10)
            return aws.errors

    errors = asyncio.run(scenario())
    assert errors, "the server sent no error"
    assert all(f'permissions violation for publish to "{SUBJECTS.update("gcp")}"' in e.lower() for e in errors)
    assert f'Publish Violation - Subject "{SUBJECTS.update("gcp")}"' in cluster.log("leaf-aws")

    async def gcp_subject_is_empty():
        async with session(topology, "coordinator") as co:
            with pytest.raises(nats.js.errors.NotFoundError):
                await co.js(topology).get_last_msg(SUBJECTS.update_stream, SUBJECTS.update("gcp"))

    asyncio.run(gcp_subject_is_empty())


@pytest.mark.parametrize(
    "subject",
    [
        SUBJECTS.global_head,
        SUBJECTS.global_data,
        kv_put_subject(SUBJECTS.kv_bucket, "spec", "hub"),
        kv_put_subject(SUBJECTS.kv_bucket, "stats.aws", "hub"),  # another cloud's stats
        f"$JS.hub.API.STREAM.DELETE.{SUBJECTS.update_stream}",
        f"$JS.hub.API.CONSUMER.CREATE.{SUBJECTS.update_stream}",  # no reading the other clouds' updates
        f"$KV.{SUBJECTS.kv_bucket}.spec",
    ],
)
def test_worker_cannot_publish_globals_the_spec_or_manage_streams(cluster, subject):
    async def scenario():
        async with session(cluster.topology, "gcp") as gcp:
            await gcp.nc.publish(subject, b"forged")
            await gcp.nc.flush()
            await until(lambda: gcp.errors, "the server's permissions violation", timeout=10)
            return gcp.errors

    assert any(
        f'permissions violation for publish to "{subject.lower()}"' in e.lower() for e in asyncio.run(scenario())
    )


def test_worker_cannot_listen_to_other_identities_inboxes(cluster):
    async def scenario():
        async with session(cluster.topology, "azure") as azure:
            await azure.nc.subscribe("_INBOX.>")
            await azure.nc.flush()
            await until(lambda: azure.errors, "the server's permissions violation", timeout=10)
            return azure.errors

    assert any('permissions violation for subscription to "_inbox.>"' in e.lower() for e in asyncio.run(scenario()))


def test_client_without_the_ca_is_refused(cluster):
    topology = cluster.topology
    seed = str(topology.identities["aws"].nkey)

    async def attempt(url: str) -> None:
        await nats.connect([url], nkeys_seed=seed, connect_timeout=2, allow_reconnect=False)

    for url in (topology.leaf["aws"], topology.leaf["aws"].replace("tls://", "nats://"), topology.hub[0]):
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's trust store does not know the fedjet CA
            asyncio.run(attempt(url))


def test_unknown_nkey_is_refused_with_an_authorization_violation(cluster, tmp_path):
    seed = write_secret(tmp_path / "stranger" / "user.nk", new_user_seed())

    kwargs = ClientAuth(nkey=str(seed), tls_ca=str(cluster.topology.ca)).connect_kwargs()
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    async def attempt(url: str) -> None:
        await nats.connect([url], connect_timeout=2, allow_reconnect=False, error_cb=on_error, **kwargs)

    for url in (cluster.topology.leaf["gcp"], cluster.topology.hub[1]):
        with pytest.raises(nats.errors.Error) as refused:
            asyncio.run(attempt(url))
        assert "authorization violation" in str(refused.value).lower()
    assert "authentication error" in cluster.log("leaf-gcp")


def _drop_local_permissions(topology: Topology) -> None:
    """Simulate a compromised or misconfigured aws leaf: its aws user may do anything locally."""
    leaf = next(s for s in topology.servers if s.name == "leaf-aws")
    text = leaf.config.read_text()
    start = text.index("      permissions {")
    end = text.index("\n      }\n", start) + len("\n      }\n")
    leaf.config.write_text(text[:start] + text[end:])


def test_the_hub_holds_a_loosened_leaf_to_its_clouds_rights(tmp_path):
    with running(_config(tmp_path, ("aws", "gcp"), hub_size=1), tmp_path, edit=_drop_local_permissions) as cluster:
        topology = cluster.topology
        assert "permissions" not in next(s for s in topology.servers if s.name == "leaf-aws").config.read_text()

        async def scenario():
            await _set_up_job(topology)
            await _wait_leaves(topology)
            async with session(topology, "aws") as aws, session(topology, "coordinator") as co:
                js = aws.js(topology)
                own = await js.publish(SUBJECTS.update("aws"), b"mine")
                refused = []
                for subject in (SUBJECTS.update("gcp"), SUBJECTS.global_head):
                    with pytest.raises(nats.errors.Error):  # the hub never shows the leaf any interest there
                        await js.publish(subject, b"forged", timeout=1.0)
                    refused.append(subject)
                with pytest.raises(nats.errors.Error):
                    await js.delete_stream(SUBJECTS.global_stream)
                overheard: list[str] = []

                async def overhear(msg: Any) -> None:
                    overheard.append(msg.subject)

                await aws.nc.subscribe("_INBOX.>", cb=overhear)  # allowed by the loosened leaf itself
                await aws.nc.flush()
                await co.js(topology).account_info()  # the coordinator's reply crosses the hub
                # The control: aws's own reply crosses the same path after it; once the subscription
                # has seen that, it was live while the coordinator's reply went by.
                await aws.js(topology).stream_info(SUBJECTS.global_stream)
                inbox = topology.identities["aws"].inbox_prefix
                await until(lambda: any(s.startswith(inbox) for s in overheard), "aws's own reply", timeout=10)
                foreign = [s for s in overheard if not s.startswith(inbox)]
                cjs = co.js(topology)
                counts = [
                    (await cjs.stream_info(name)).state.messages
                    for name in (SUBJECTS.update_stream, SUBJECTS.global_stream)
                ]
                return own, refused, foreign, counts

        own, refused, foreign, counts = asyncio.run(scenario())
    assert own.stream == SUBJECTS.update_stream
    assert len(refused) == 2 and foreign == []
    assert counts == [1, 1 + GLOBAL_CHUNKS]  # aws's own update; only what the coordinator published


def test_client_certificates_when_required(tmp_path):
    config = _config(tmp_path, ("aws",), hub_size=1, observers=(), client_certs=True)
    with running(config, tmp_path) as cluster:
        topology = cluster.topology
        entry = topology.identities["aws"]
        assert entry.cert is not None and entry.cert.parent.name == "aws"

        async def with_cert():
            async with session(topology, "aws") as aws:  # the leaf presents its own certificate to the hub
                return await _retry(aws.js(topology).account_info, 20, "JetStream through a leaf with mTLS")

        async def without_cert():
            kwargs = ClientAuth(nkey=str(entry.nkey), tls_ca=str(topology.ca)).connect_kwargs()
            await nats.connect([topology.leaf["aws"]], connect_timeout=2, allow_reconnect=False, **kwargs)

        assert asyncio.run(with_cert()) is not None
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
            asyncio.run(without_cert())
    assert "TLS handshake error" in cluster.log("leaf-aws")


def test_r3_streams_keep_accepting_updates_after_a_hub_node_dies(cluster):
    """Run last in this module: it kills hub-2 for good."""
    topology = cluster.topology

    async def scenario():
        async with session(topology, "aws") as aws, session(topology, "coordinator") as co:
            before = (await co.js(topology).stream_info(SUBJECTS.update_stream)).state.messages
            cluster.stop("hub-2", signal.SIGKILL)
            js = aws.js(topology)
            acks = []
            for i in range(3):
                msg_id = f"aws/0/after-kill-{i}"
                acks.append(
                    await _retry(
                        lambda i=i, msg_id=msg_id: js.publish(
                            SUBJECTS.update("aws"), f"update {i}".encode(), headers={"Nats-Msg-Id": msg_id}
                        ),
                        20,
                        "publishing with one hub node down",
                    )
                )
            after = await _retry(lambda: co.js(topology).stream_info(SUBJECTS.update_stream), 20, "stream info")
            return before, acks, after

    before, acks, after = asyncio.run(scenario())
    assert all(ack.stream == SUBJECTS.update_stream for ack in acks)
    assert after.state.messages == before + 3
