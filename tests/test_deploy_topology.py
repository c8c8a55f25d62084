"""The generated topology on real servers: a 3-node TLS hub with JetStream and a leaf node per cloud.

Every refusal asserted here comes from nats-server itself (its error text, its log), never from a
check inside fedjet.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js import api

from fedjet.broker.auth import ClientAuth
from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import kv_put_subject
from fedjet.channel.island import add_island_source
from fedjet.deploy.configs import LeafNode, TlsFiles, User, leaf_config
from fedjet.deploy.files import write_secret
from fedjet.deploy.identities import new_user_seed
from fedjet.deploy.permissions import Permissions
from tests.conftest import until
from tests.topology_helpers import (
    CHUNK_BYTES,
    CLOUDS,
    GLOBAL_CHUNKS,
    KV_STREAM,
    SUBJECTS,
    Cluster,
    _config,
    _free_base_port,
    _retry,
    _set_up_job,
    _wait_leaves,
    running,
    session,
)


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
        # island mode: not another cloud's island subject, stream, domain, deliveries or announcement
        SUBJECTS.island_update("aws"),
        f"$JS.API.STREAM.CREATE.{SUBJECTS.island_stream('aws')}",
        f"$JS.API.STREAM.DELETE.{SUBJECTS.island_stream('gcp')}",  # nor drop its own queued updates
        "$JS.aws.API.INFO",
        f"{SUBJECTS.source_deliver('aws')}.S.forged",
        kv_put_subject(SUBJECTS.kv_bucket, SUBJECTS.island_key("aws"), "hub"),
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


@pytest.mark.parametrize("credentials, arrives", [("aws", False), ("gcp", True)])
def test_a_leaf_cannot_pose_as_another_clouds_island(cluster, tmp_path, credentials, arrives):
    """gcp's leaf is down; a leaf server holding ``credentials``' leaf seed runs JetStream in the
    domain ``gcp`` with an island stream of forged "gcp" updates, and the hub sources gcp's island.
    With aws's seed the hub never asks it (its leaf may only hear its own domain): nothing arrives.
    The control, gcp's own seed, shows the forged update would have arrived otherwise."""
    topology = cluster.topology
    cluster.stop("leaf-gcp")
    rogue = _rogue_island(topology, tmp_path, credentials, domain="gcp")
    try:

        async def scenario() -> int:
            await _retry(lambda: _forge_island_update(rogue.url, topology), 30, "the rogue leaf's island stream")
            async with session(topology, "coordinator") as co:
                js = co.nc.jetstream(timeout=10.0)  # the module's hub has lost a node by now
                await _retry(lambda: add_island_source(js, SUBJECTS, "gcp"), 30, "sourcing gcp's island")
                try:
                    deadline = asyncio.get_running_loop().time() + (20 if arrives else 8)
                    while asyncio.get_running_loop().time() < deadline:
                        with contextlib.suppress(nats.js.errors.NotFoundError):
                            msg = await js.get_last_msg(SUBJECTS.update_stream, SUBJECTS.update("gcp"))
                            return 1 if msg.data == b"forged gcp update" else 0
                        await asyncio.sleep(0.5)
                    return 0
                finally:
                    await _retry(lambda: _drop_island_source(js, "gcp"), 30, "dropping gcp's island source")
                    if arrives:
                        await js.purge_stream(SUBJECTS.update_stream, subject=SUBJECTS.update("gcp"))

        assert asyncio.run(scenario()) == int(arrives)
    finally:
        rogue.stop()
        cluster.start("leaf-gcp")
        cluster.wait_listening()
        asyncio.run(_wait_leaves(topology))


@dataclass
class _Rogue:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _rogue_island(topology: Any, tmp_path: Path, credentials: str, *, domain: str) -> _Rogue:
    """A leaf server its operator configured freely: ``credentials``' leaf seed towards the hub,
    JetStream in ``domain``, a local user (aws's NKEY) allowed everything."""
    leaf = next(s for s in topology.servers if s.cloud == credentials)
    directory = tmp_path / "rogue"
    directory.mkdir()
    shutil.copy(leaf.config.parent / "leaf-seed.conf", directory / "leaf-seed.conf")
    hub_leaf_urls = tuple(re.findall(r"nats-leaf://([0-9.:]+)", leaf.config.read_text()))
    port = _free_base_port(1)
    everything = Permissions(publish=(">",), subscribe=(">",))
    node = LeafNode(
        name="rogue", host="127.0.0.1", client_port=port, hub_leaf_urls=hub_leaf_urls, seed_include="leaf-seed.conf",
        tls=TlsFiles(cert=leaf.config.parent / "server.pem", key=leaf.config.parent / "server-key.pem",
                     ca=topology.ca, verify=False),
        remote_cert=None, users=(User(public_key=topology.identities["aws"].public_key, permissions=everything),),
        store_dir=directory / "jetstream", jetstream_domain=domain,
    )  # fmt: skip
    conf = directory / "nats.conf"
    conf.write_text(leaf_config(node))
    log = (directory / "rogue.log").open("ab")
    proc = subprocess.Popen([find_nats_server(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return _Rogue(proc, f"tls://127.0.0.1:{port}")


async def _forge_island_update(url: str, topology: Any) -> None:
    nc = await nats.connect(
        [url], connect_timeout=3, max_reconnect_attempts=1, **topology.client_auth("aws").connect_kwargs()
    )
    try:
        js = nc.jetstream(timeout=3.0)
        config = api.StreamConfig(name=SUBJECTS.island_stream("gcp"), subjects=[SUBJECTS.island_update("gcp")])
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.add_stream(config)
        await js.publish(SUBJECTS.island_update("gcp"), b"forged gcp update")
    finally:
        await nc.close()


async def _drop_island_source(js: Any, cloud: str) -> None:
    info = await js.stream_info(SUBJECTS.update_stream)
    info.config.sources = [s for s in info.config.sources or [] if s.name != SUBJECTS.island_stream(cloud)]
    await js.update_stream(info.config)
