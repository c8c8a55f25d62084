"""The generated topology, edited or with options, each on servers of its own: a leaf whose local
permissions are gone is still held to its cloud's rights by the hub, and client certificates when
the topology requires them.

Every refusal asserted here comes from nats-server itself (its error text, its log), never from a
check inside fedjet.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import nats
import nats.errors
import pytest

from fedjet.broker.auth import ClientAuth
from fedjet.deploy import Topology
from tests.conftest import until
from tests.topology_helpers import GLOBAL_CHUNKS, SUBJECTS, _config, _retry, _set_up_job, _wait_leaves, running, session


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
