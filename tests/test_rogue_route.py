"""A cloud cannot join the hub's cluster with anything it holds: real nats-server processes.

The adversary is a cloud operator. It holds its leaf's folder (``servers/leaf-<cloud>/``), its
identity folder (``identities/<cloud>/``) and the client CA (``ca/ca.pem``), and it can run a
nats-server of its own. Here the topology is generated with client certificates (so a cloud
holds the most it ever can: its leaf's listening certificate, the leaf's client certificate and
its identity's) and started on loopback: a 3-node hub cluster with R3 JetStream and a leaf per
cloud. Then:

* a rogue nats-server (the real binary) per certificate/key pair found in aws's folders routes
  to hub-0's cluster port, not checking who answers (``insecure``: the adversary does not care);
  none may get a route (the rogue's own ``/routez``), and an anonymous client of the rogue must
  get no answer from the hub's JetStream API;
* a TLS client that presents each pair whatever the server asks for (a patched server would)
  is refused by hub-0 itself, in its own words (its log names each certificate);
* each route check is live on its own: past the routes CA (its offline key, as if leaked) a
  route still needs one of the pinned keys, and with a pinned key still the route identity;
* a control: a rogue with what only a hub node holds (hub-1's route certificate and the routes
  CA) does join, and its anonymous client does read the hub's stream names. The harness sees a
  join when the credentials are right, so the refusals above come from the credentials.

Every refusal asserted here comes from nats-server (its ``/routez``, its log, its TLS alert).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedjet.deploy.files import write_file, write_secret
from tests.rogue_helpers import (
    SUBJECTS,
    WAIT,
    Deployed,
    _answered,
    _common_name,
    _create_stream,
    _fingerprint,
    _sign_route,
    ask_hub_jetstream,
    held_by,
    key_pairs,
    rogues,
    route_attempt,
    wait_for_log,
)
from tests.topology_helpers import CLOUDS, _config, _retry, running

ADVERSARY = "aws"
ATTEMPTS = 3  # refused route attempts each rogue must show before the verdict


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    out = tmp_path_factory.mktemp("rogue-route")
    config = _config(out, CLOUDS, client_certs=True)
    with running(config, out) as cluster:
        asyncio.run(_create_stream(cluster.topology))
        yield Deployed(cluster, config)


def test_nothing_a_cloud_holds_gets_a_route_to_the_hub(deployed, tmp_path):
    topology = deployed.topology
    pairs = key_pairs(held_by(topology, ADVERSARY))
    leaf = next(s for s in topology.servers if s.cloud == ADVERSARY).config.parent
    identity = topology.identities[ADVERSARY].nkey.parent
    assert (leaf / "server.pem", leaf / "server-key.pem") in pairs  # the reviewer's rogue: the leaf's own
    assert (identity / "client.pem", identity / "client-key.pem") in pairs
    with rogues(deployed, tmp_path, pairs, ca=topology.ca) as started:
        deadline = time.monotonic() + WAIT
        waiting = list(started)
        while waiting:
            for rogue in started:
                routes = rogue.routez()
                assert routes["num_routes"] == 0, (
                    f"rogue {rogue.name} with {rogue.cert} joined the hub cluster: {routes['routes']}"
                )
            waiting = [r for r in started if r.refused_attempts(deployed.hub0_route) < ATTEMPTS]
            assert time.monotonic() < deadline, (
                f"hub-0 did not refuse {ATTEMPTS} route attempts of each rogue within {WAIT}s: "
                + "; ".join(f"{r.name} ({r.cert.name}): {r.log()[-1500:]}" for r in waiting)
            )
            time.sleep(0.1)
        answers = {rogue.name: asyncio.run(ask_hub_jetstream(rogue.ports()["nats"][0])) for rogue in started}
        final = {rogue.name: rogue.routez()["num_routes"] for rogue in started}
    assert final == {rogue.name: 0 for rogue in started}
    for name, got in answers.items():
        assert set(got.values()) == {"NoRespondersError"}, f"{name}'s anonymous client got answers: {got}"
    assert "TLS route handshake error" in deployed.cluster.log("hub-0")


def test_the_hub_itself_refuses_every_certificate_a_cloud_holds(deployed):
    topology = deployed.topology
    pairs = key_pairs(held_by(topology, ADVERSARY))
    host, port = deployed.config.host, deployed.config.hub_ports(0)[1]
    root = topology.ca.parent.parent
    outcomes = {
        str(cert.relative_to(root)): route_attempt(cert, key, host, port, deployed.cluster_name())
        for cert, key in pairs
    }
    assert all(outcome.startswith("alert: ") for outcome in outcomes.values()), outcomes  # in the handshake
    wait_for_log(
        deployed.cluster,
        "hub-0",
        [f"certificate signed by unknown authority (CN={_common_name(cert)} SHA-256: {_fingerprint(cert)})"
         for cert, _ in pairs],
    )  # fmt: skip


def test_each_route_check_refuses_on_its_own_even_with_the_routes_ca_key(deployed, tmp_path):
    """Past the routes CA (as if its offline key leaked) a route still needs a pinned key, and with
    a pinned key still the route identity: each check is live in nats-server, not shadowed by the CA."""
    topology = deployed.topology
    ca_dir, hub1 = topology.ca.parent, next(s for s in topology.servers if s.name == "hub-1").config.parent
    host, port, cluster = deployed.config.host, deployed.config.hub_ports(0)[1], deployed.cluster_name()
    identity = deployed.route_user()
    fresh = ec.generate_private_key(ec.SECP256R1())
    fresh_key = write_secret(
        tmp_path / "fresh-key.pem",
        fresh.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    unpinned = write_file(tmp_path / "unpinned.pem", _sign_route(ca_dir, fresh.public_key(), "rogue", (identity,)))
    hub1_key = serialization.load_pem_private_key((hub1 / "route-key.pem").read_bytes(), password=None)
    anonymous = write_file(tmp_path / "anonymous.pem", _sign_route(ca_dir, hub1_key.public_key(), "hub-1", ()))
    outcomes = {
        "unpinned key": route_attempt(unpinned, fresh_key, host, port, cluster),
        "no route identity": route_attempt(anonymous, hub1 / "route-key.pem", host, port, cluster),
        "hub-1's own": route_attempt(hub1 / "route.pem", hub1 / "route-key.pem", host, port, cluster),
    }
    assert outcomes["unpinned key"].startswith("closed"), outcomes  # right after the handshake
    assert outcomes["no route identity"] == "answered: b\"-ERR 'Authorization Violation'\\r\\n\"", outcomes
    own = outcomes["hub-1's own"]  # the probe itself can join: the refusals above are the hub's
    assert own.startswith("answered: ") and "PONG" in own and "-ERR" not in own, outcomes
    wait_for_log(
        deployed.cluster, "hub-0", ["TLS route handshake error: certificate not pinned", "authentication error"]
    )


def test_control_a_rogue_with_a_hub_nodes_route_certificate_does_join(deployed, tmp_path):
    """What only a hub node holds passes: the refusals above are the credentials', not the harness's."""
    hub1 = next(s for s in deployed.topology.servers if s.name == "hub-1").config.parent
    pair = [(hub1 / "route.pem", hub1 / "route-key.pem")]
    with rogues(deployed, tmp_path, pair, ca=hub1 / "routes-ca.pem") as (rogue,):
        deadline = time.monotonic() + WAIT
        while rogue.routez()["num_routes"] == 0:
            assert time.monotonic() < deadline, f"the control rogue did not join within {WAIT}s: {rogue.log()[-3000:]}"
            time.sleep(0.1)
        url = rogue.ports()["nats"][0]

        async def names() -> dict[str, bytes | str]:
            return await _retry(lambda: _answered(url), WAIT, "an answer from the hub's JetStream through the rogue")

        answers = asyncio.run(names())
    assert json.loads(answers["$JS.API.STREAM.NAMES"])["streams"] == [SUBJECTS.update_stream]
