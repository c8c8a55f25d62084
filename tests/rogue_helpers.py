"""The cloud operator's tools against the hub's cluster port, for ``test_rogue_route.py``: what a
cloud holds, the certificate/key pairs in it, a rogue nats-server routing with one, a route
connection by hand, a route certificate signed with the routes CA's key, and what the hub logs."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.js import api

from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import JobSubjects
from fedjet.deploy import Topology, TopologyConfig
from fedjet.deploy.topology import hostport
from tests.topology_helpers import JOB, Cluster, _retry, session

SUBJECTS = JobSubjects(JOB)
WAIT = 30.0  # seconds for any one thing to happen


@dataclass(frozen=True)
class Deployed:
    cluster: Cluster
    config: TopologyConfig

    @property
    def topology(self) -> Topology:
        return self.cluster.topology

    @property
    def hub0_route(self) -> str:
        return hostport(self.config.host, self.config.hub_ports(0)[1])

    def _hub0(self, pattern: str, what: str) -> str:
        hub = next(s for s in self.topology.servers if s.name == "hub-0").config.read_text()
        found = re.search(pattern, hub)
        assert found, f"hub-0's config names no {what}"
        return found.group(1)

    def cluster_name(self) -> str:
        return self._hub0(r'cluster \{\s*name: "([^"]+)"', "cluster")

    def route_user(self) -> str:
        """The one user the cluster authorizes (a route certificate's URI name, by ``verify_and_map``)."""
        return self._hub0(r'\n  authorization \{\s*user: "([^"]+)"', "route user")


async def _create_stream(topology: Topology) -> None:
    """Something on the hub for a rogue to name: the job's R3 updates stream."""
    async with session(topology, "coordinator") as co:
        js = co.nc.jetstream(timeout=5.0)
        config = api.StreamConfig(name=SUBJECTS.update_stream, subjects=[SUBJECTS.updates], num_replicas=3)
        await _retry(lambda: js.add_stream(config), WAIT, "creating the R3 updates stream")


def held_by(topology: Topology, cloud: str) -> list[Path]:
    """Everything a cloud's operator holds: its leaf's folder, its identity folder, the client CA."""
    leaf = next(s for s in topology.servers if s.cloud == cloud).config.parent
    return [leaf, topology.identities[cloud].nkey.parent, topology.ca]


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_pairs(paths: list[Path]) -> list[tuple[Path, Path]]:
    """Every (certificate, private key) pair among ``paths``, matched by public key, whatever the file names."""
    files = sorted({f for p in paths for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file()})
    certs: dict[Path, x509.Certificate] = {}
    keys: dict[Path, PrivateKeyTypes] = {}
    for path in files:
        data = path.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs[path] = x509.load_pem_x509_certificate(data)
        if b"PRIVATE KEY-----" in data:
            keys[path] = serialization.load_pem_private_key(data, password=None)
    return [
        (cert_path, key_path)
        for cert_path, cert in certs.items()
        for key_path, key in keys.items()
        if _spki(key.public_key()) == _spki(cert.public_key())
    ]


@dataclass
class Rogue:
    """A nats-server the adversary runs: anonymous clients, one route to the hub, the given certificate."""

    name: str
    cert: Path
    work: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, work: Path, *, cert: Path, key: Path, ca: Path, route: str, cluster: str) -> Rogue:
        work.mkdir(parents=True)
        config = work / "rogue.conf"
        tls = {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca), "insecure": True, "timeout": 2}
        body = {
            "server_name": name,
            "host": "127.0.0.1",
            "port": -1,
            "http_port": -1,
            "cluster": {
                "name": cluster,
                "host": "127.0.0.1",
                "port": -1,
                "routes": [f"nats-route://{route}"],
                "tls": tls,
            },
        }
        config.write_text(json.dumps(body))  # nats-server reads JSON as config too
        with (work / "rogue.log").open("wb") as log:
            proc = subprocess.Popen(
                [find_nats_server(), "-c", str(config), "--ports_file_dir", str(work)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, cert, work, proc)

    def log(self) -> str:
        return (self.work / "rogue.log").read_text(errors="replace")

    def ports(self) -> dict[str, list[str]]:
        deadline = time.monotonic() + WAIT
        path = self.work / f"{Path(find_nats_server()).name}_{self.proc.pid}.ports"
        while True:
            assert self.proc.poll() is None, f"rogue {self.name} exited: {self.log()[-2000:]}"
            with contextlib.suppress(OSError, ValueError):
                ports = json.loads(path.read_text())
                if ports.get("nats") and ports.get("monitoring"):
                    return dict(ports)
            assert time.monotonic() < deadline, f"rogue {self.name} did not report its ports within {WAIT}s"
            time.sleep(0.05)

    def routez(self) -> dict[str, Any]:
        url = self.ports()["monitoring"][0] + "/routez"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return dict(json.loads(reply.read()))

    def refused_attempts(self, route: str) -> int:
        """Route connections to ``route`` that the rogue saw closed (each one a refused attempt)."""
        return len(re.findall(rf"{re.escape(route)} - rid:\d+ - Router connection closed", self.log()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def rogues(deployed: Deployed, work: Path, pairs: list[tuple[Path, Path]], ca: Path) -> Iterator[list[Rogue]]:
    started: list[Rogue] = []
    try:
        for i, (cert, key) in enumerate(pairs):
            started.append(
                Rogue.start(
                    f"rogue-{i}",
                    work / f"rogue-{i}",
                    cert=cert,
                    key=key,
                    ca=ca,
                    route=deployed.hub0_route,
                    cluster=deployed.cluster_name(),
                )
            )
        yield started
    finally:
        for rogue in started:
            rogue.stop()
        assert all(rogue.proc.poll() is not None for rogue in started)


async def ask_hub_jetstream(url: str) -> dict[str, bytes | str]:
    """What an anonymous client of ``url`` gets for the hub's stream names and stream info."""
    nc = await nats.connect([url], connect_timeout=3, allow_reconnect=False)
    answers: dict[str, bytes | str] = {}
    try:
        for subject in (
            "$JS.API.STREAM.NAMES",
            f"$JS.API.STREAM.INFO.{SUBJECTS.update_stream}",
            "$JS.hub.API.STREAM.NAMES",
        ):
            try:
                answers[subject] = (await nc.request(subject, b"", timeout=2)).data
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as e:
                answers[subject] = type(e).__name__
    finally:
        await nc.close()
    return answers


def route_attempt(cert: Path, key: Path, host: str, port: int, cluster: str) -> str:
    """A route connection by hand, presenting ``cert`` whatever the server asks for (a patched
    server would): routes start with TLS, then the server's INFO, then the route's CONNECT.

    What the hub answers: ``alert: <reason>`` (refused in the handshake), ``closed`` (right after
    it), or ``answered: <bytes>`` to the CONNECT and a PING (``-ERR ...``, or ``PONG``: joined).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the adversary does not care who answers
    context.load_cert_chain(cert, key)
    connect = {"echo": True, "verbose": False, "pedantic": False, "tls_required": True, "name": "NROGUEPROBE",
               "cluster": cluster, "headers": True}  # fmt: skip
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(5)
                if not tls.recv(65536).startswith(b"INFO "):
                    return "closed"
                tls.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
                reply = b""
                while not any(word in reply for word in (b"PONG", b"-ERR")):
                    data = tls.recv(65536)
                    if not data:
                        break
                    reply += data
                return f"answered: {reply!r}"
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as e:
            return f"closed: {type(e).__name__}"
        except ssl.SSLError as e:
            return f"alert: {e.reason}"
        except (ConnectionError, TimeoutError) as e:
            return f"closed: {type(e).__name__}"


def wait_for_log(cluster: Cluster, name: str, lines: list[str]) -> None:
    """Each of ``lines`` appears in ``name``'s log (bounded: nats-server writes it right after acting)."""
    deadline = time.monotonic() + WAIT
    while missing := [line for line in lines if line not in cluster.log(name)]:
        assert time.monotonic() < deadline, f"{name} never logged {missing} within {WAIT}s: {cluster.log(name)[-3000:]}"
        time.sleep(0.05)


def _fingerprint(cert: Path) -> str:
    """How nats-server names a refused certificate in its log: SHA-256 of the DER certificate."""
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _common_name(cert: Path) -> str:
    subject = x509.load_pem_x509_certificate(cert.read_bytes()).subject
    return str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _sign_route(ca_dir: Path, public: Any, common_name: str, uris: tuple[str, ...]) -> bytes:
    """A route certificate for ``public`` signed with the routes CA's key (what only the operator holds)."""
    ca_key = serialization.load_pem_private_key((ca_dir / "routes-ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "routes-ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName([*names, *(x509.UniformResourceIdentifier(u) for u in uris)]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


async def _answered(url: str) -> dict[str, bytes | str]:
    answers = await ask_hub_jetstream(url)
    if not isinstance(answers["$JS.API.STREAM.NAMES"], bytes):
        raise nats.errors.NoRespondersError
    return answers
