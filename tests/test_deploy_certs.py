"""The certificates the topology generator writes: who signs each, for which use, naming which hosts.

The adversary is a cloud operator: it holds its leaf's folder (``servers/leaf-<cloud>/``), its
identity folder (``identities/<cloud>/``) and the client CA (``ca/ca.pem``). Nothing in there may
pass the hub's route port (routes trust only the routes CA and pin the hub nodes' route keys),
serve as a client certificate where it is a listener's, or be valid for the hub's names. The
generation here gives the hub and each leaf hosts of their own, as a real deployment across
clouds does; ``tests/test_rogue_route.py`` runs the same layout on loopback against real servers.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedjet.deploy import TopologyConfig, generate, load_topology
from fedjet.deploy.certs import CertificateAuthority, Use
from fedjet.deploy.topology import route_identity
from fedjet.errors import ConfigError

JOB = "j"
CLOUDS = ("aws", "gcp")
HUB_HOST = "hub.example.org"
LEAF_HOSTS = {"aws": "aws.example.org", "gcp": "gcp.example.org"}
HUB_NAMES = (HUB_HOST, "hub-0", "hub-1", "hub-2")  # what the hub is reached by
SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "deploy"
    config = TopologyConfig(
        clouds=CLOUDS, job=JOB, out=out, host=HUB_HOST, leaf_hosts=LEAF_HOSTS, client_certs=True, base_port=30000
    )
    generate(config)
    return out


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def alt_names(cert: x509.Certificate) -> set[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(name.value) for name in names}


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):  # another issuer name, or another key's signature
        return False
    return True


def spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def held_by(root: Path, cloud: str) -> list[Path]:
    """Every file a cloud's operator holds."""
    folders = (root / "servers" / f"leaf-{cloud}", root / "identities" / cloud)
    return [*sorted(f for folder in folders for f in folder.rglob("*") if f.is_file()), root / "ca" / "ca.pem"]


def certificates(files: list[Path]) -> dict[Path, x509.Certificate]:
    return {f: load(f) for f in files if b"-----BEGIN CERTIFICATE-----" in f.read_bytes()}


def private_keys(files: list[Path]) -> dict[Path, bytes]:
    """The public half (SubjectPublicKeyInfo) of every private key among ``files``."""
    found = {}
    for f in files:
        if b"PRIVATE KEY-----" in f.read_bytes():
            key = serialization.load_pem_private_key(f.read_bytes(), password=None)
            found[f] = spki(key.public_key())
    return found


def is_ca(cert: x509.Certificate) -> bool:
    return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_certificate_a_cloud_holds_is_from_the_client_ca_and_for_one_use(root, cloud):
    client_ca, routes_ca = load(root / "ca" / "ca.pem"), load(root / "ca" / "routes-ca.pem")
    held = certificates(held_by(root, cloud))
    own = {f.relative_to(root).as_posix(): cert for f, cert in held.items() if not is_ca(cert)}
    leaf = f"servers/leaf-{cloud}"
    assert set(own) == {f"{leaf}/server.pem", f"{leaf}/client.pem", f"identities/{cloud}/client.pem"}
    assert [cert for cert in held.values() if is_ca(cert)] == [client_ca]  # the client CA, and no other
    for name, cert in own.items():
        assert signed_by(cert, client_ca) and not signed_by(cert, routes_ca), name
    assert usages(own[f"{leaf}/server.pem"]) == {SERVER}  # the leaf's listener: never a client certificate
    for name in (f"{leaf}/client.pem", f"identities/{cloud}/client.pem"):
        assert usages(own[name]) == {CLIENT}, name  # client use only
        assert alt_names(own[name]) == set(), name  # and no host it could serve


@pytest.mark.parametrize("cloud", CLOUDS)
def test_nothing_a_cloud_holds_is_valid_for_the_hubs_names(root, cloud):
    client_ca = load(root / "ca" / "ca.pem")
    held = [cert for cert in certificates(held_by(root, cloud)).values() if not is_ca(cert)]
    leaf = load(root / "servers" / f"leaf-{cloud}" / "server.pem")
    assert alt_names(leaf) == {LEAF_HOSTS[cloud], "localhost", "127.0.0.1", f"leaf-{cloud}"}
    for hub_name in HUB_NAMES:
        verifier = PolicyBuilder().store(Store([client_ca])).build_server_verifier(x509.DNSName(hub_name))
        for cert in held:
            assert hub_name not in alt_names(cert)
            with pytest.raises(VerificationError):
                verifier.verify(cert, [])
    for i in range(3):  # the check itself: the hub's own listener passes it
        hub = load(root / "servers" / f"hub-{i}" / "server.pem")
        for hub_name in (HUB_HOST, f"hub-{i}"):
            verifier = PolicyBuilder().store(Store([client_ca])).build_server_verifier(x509.DNSName(hub_name))
            assert verifier.verify(hub, [])[0] == hub


def test_route_certificates_come_from_a_routes_ca_whose_key_no_cloud_holds(root):
    client_ca, routes_ca = load(root / "ca" / "ca.pem"), load(root / "ca" / "routes-ca.pem")
    assert spki(client_ca.public_key()) != spki(routes_ca.public_key())
    for i in range(3):
        folder = root / "servers" / f"hub-{i}"
        route = load(folder / "route.pem")
        assert signed_by(route, routes_ca) and not signed_by(route, client_ca)
        assert usages(route) == {SERVER, CLIENT}  # each hub node dials and accepts the others
        assert {HUB_HOST, f"hub-{i}", route_identity(JOB)} <= alt_names(route)
        assert (folder / "routes-ca.pem").read_bytes() == (root / "ca" / "routes-ca.pem").read_bytes()
        hub = load(folder / "server.pem")
        assert signed_by(hub, client_ca) and usages(hub) == {SERVER}  # the listener is not a route certificate
    everything = sorted(f for f in root.rglob("*") if f.is_file())
    keys = private_keys(everything)
    holders = [f.relative_to(root).as_posix() for f, public in keys.items() if public == spki(routes_ca.public_key())]
    assert holders == ["ca/routes-ca-key.pem"]  # the operator's private tree, beside ca-key.pem
    route_keys = {spki(load(root / "servers" / f"hub-{i}" / "route.pem").public_key()) for i in range(3)}
    for cloud in CLOUDS:
        held = held_by(root, cloud)
        assert not set(private_keys(held).values()) & (route_keys | {spki(routes_ca.public_key())})
        held_certs = certificates(held).values()
        assert routes_ca not in held_certs and not [c for c in held_certs if signed_by(c, routes_ca)]


def _cluster_block(config: str) -> str:
    start = config.index("\ncluster {\n")
    return config[start : config.index("\n}\n", start)]


def test_hub_routes_trust_only_the_routes_ca_pin_every_route_key_and_authorize_the_route_identity(root):
    pins = sorted(
        hashlib.sha256(spki(load(root / "servers" / f"hub-{i}" / "route.pem").public_key())).hexdigest()
        for i in range(3)
    )
    for i in range(3):
        folder = root / "servers" / f"hub-{i}"
        config = (folder / "nats.conf").read_text()
        cluster = _cluster_block(config)
        assert f'cert_file: "{folder / "route.pem"}"' in cluster
        assert f'ca_file: "{folder / "routes-ca.pem"}"' in cluster
        assert "ca.pem" not in cluster.replace("routes-ca.pem", "")  # never the client CA on routes
        assert "verify_and_map: true" in cluster
        assert sorted(re.findall(r'"([0-9a-f]{64})"', cluster)) == pins
        assert f'authorization {{\n    user: "{route_identity(JOB)}"\n  }}' in cluster
        outside = config.replace(cluster, "")
        assert "route" not in outside and outside.count(str(root / "ca" / "ca.pem")) == 2  # clients, leaf nodes
    for cloud in CLOUDS:
        leaf = (root / "servers" / f"leaf-{cloud}" / "nats.conf").read_text()
        assert "route" not in leaf and "hub-" not in leaf
        assert f'cert_file: "{root / "servers" / f"leaf-{cloud}" / "client.pem"}"' in leaf  # to the hub


def test_leaves_listen_on_their_own_hosts_and_the_map_says_so(root):
    topology = load_topology(root)
    assert topology.leaf == {cloud: f"tls://{LEAF_HOSTS[cloud]}:{30009 + i}" for i, cloud in enumerate(CLOUDS)}
    assert list(topology.hub) == [f"tls://{HUB_HOST}:{30000 + i}" for i in range(3)]
    for cloud in CLOUDS:
        leaf = (root / "servers" / f"leaf-{cloud}" / "nats.conf").read_text()
        assert f'host: "{LEAF_HOSTS[cloud]}"' in leaf
        assert leaf.count(f"nats-leaf://{HUB_HOST}:") == 3  # it reaches the hub at the hub's host


def test_a_hub_of_one_node_has_no_routes_and_no_routes_ca(tmp_path):
    generate(TopologyConfig(clouds=("aws",), job=JOB, out=tmp_path, hub_size=1, base_port=30000))
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca-key.pem", "ca.pem"]
    assert not list(tmp_path.rglob("route*"))
    assert "cluster" not in (tmp_path / "servers" / "hub-0" / "nats.conf").read_text()


@pytest.mark.parametrize(
    ("leaf_hosts", "match"),
    [({"azure": "a.example.org"}, "not one of the clouds"), ({"aws": "bad host"}, "neither an IP address")],
)
def test_leaf_hosts_are_checked(tmp_path, leaf_hosts, match):
    with pytest.raises(ConfigError, match=match):
        TopologyConfig(clouds=("aws",), job=JOB, out=tmp_path, leaf_hosts=leaf_hosts)


def test_a_client_certificate_names_no_host(tmp_path):
    ca = CertificateAuthority.create("test CA")
    with pytest.raises(ValueError, match="names no host"):
        ca.issue("x", use=Use.CLIENT, hosts=("example.org",), directory=tmp_path)
