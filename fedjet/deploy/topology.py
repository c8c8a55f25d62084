"""``fedjet deploy nats``: a NATS hub cluster plus one leaf node per cloud, locked down per identity.

``generate(TopologyConfig(...))`` writes, under ``out``::

    topology.json                        the map below, for scripts, tests and the CLI
    ca/ca.pem, ca/ca-key.pem             the client CA (keep ca-key.pem offline): every listener
                                         clients and leaf nodes verify, every client certificate
    ca/routes-ca.pem, routes-ca-key.pem  the routes CA (keep the key offline): hub route certificates only
    servers/hub-<i>/nats.conf            hub nodes: JetStream (domain ``jetstream_domain``), routes
    servers/hub-<i>/server{,-key}.pem    the hub node's listening certificate (client CA, server use)
    servers/hub-<i>/route{,-key}.pem     its route certificate (routes CA), with ``routes-ca.pem``
    servers/hub-<i>/jetstream/           each hub node's JetStream store
    servers/leaf-<cloud>/nats.conf       a cloud's leaf node: JetStream in the domain <cloud> (island mode)
    servers/leaf-<cloud>/jetstream/      its store: the cloud's queued updates, mirrors of the hub's
    servers/leaf-<cloud>/server{,-key}.pem  the leaf's listening certificate (client CA, server use)
    servers/leaf-<cloud>/client{,-key}.pem  what the leaf presents to the hub, with ``client_certs=True``
    servers/leaf-<cloud>/leaf-seed.conf  the leaf's NKEY seed (0600), included by its nats.conf
    identities/<name>/user.nk            one NKEY seed (0600) per cloud, the coordinator, each observer
    identities/<name>/client{,-key}.pem  client certificates, with ``client_certs=True``

A hub of one node has no routes, hence no routes CA and no route certificates.

Ports, from ``base_port`` B with ``n = hub_size`` hub nodes and clouds c_0, c_1, ...::

    B + i          client port of hub-<i>          (i < n)
    B + n + i      cluster (route) port of hub-<i>
    B + 2n + i     leafnode port of hub-<i>
    B + 3n + j     client port of leaf-<c_j>

Every connection is TLS. Clients authenticate with their NKEY; cloud workers connect to their
own cloud's leaf, the coordinator and observers to the hub. The job's JetStream lives on the hub
and every client reaches it through the domain API (``nats.jetstream(domain=jetstream_domain)``).
With ``islands`` (the default) each leaf also runs JetStream in a domain named after its cloud:
the worker keeps its updates there and reads mirrors of the hub's versions and spec, so a cut
link to the hub costs no training (``fedjet.channel.island``); ``islands=False`` writes leaves
without JetStream (every read and write of a worker crosses the link).

What a cloud holds (its leaf's folder, its identity folder, ``ca/ca.pem``) never passes the hub's
route port: routes trust only the routes CA, whose certificates exist only in the hub nodes'
folders, accept only those certificates' pinned keys, and authorize only the route identity they
carry. Every certificate a cloud holds is signed by the client CA and is either a listener's
(server use only) or a client's (client use only, no host name). A leaf's listening certificate
names its own host (``leaf_hosts``, by default the one ``host``), ``localhost``, ``127.0.0.1`` and
``leaf-<cloud>``, never ``hub-<i>``; where the leaves have hosts of their own it names nothing the
hub is reached by from elsewhere.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedjet.broker.auth import inbox_prefix, public_key_of_seed
from fedjet.broker.subjects import check_token
from fedjet.deploy.certs import CertFiles, CertificateAuthority, Use
from fedjet.deploy.configs import (
    HubNode,
    KeyPair,
    LeafNode,
    RouteTls,
    TlsFiles,
    User,
    hub_config,
    leaf_config,
    leaf_seed_include,
)
from fedjet.deploy.files import write_file, write_secret
from fedjet.deploy.identities import NkeyUser, create_user, new_user_seed
from fedjet.deploy.manifest import TOPOLOGY_FILE, IdentityEntry, ServerEntry, Topology
from fedjet.deploy.permissions import Role, permissions_for
from fedjet.errors import ConfigError

COORDINATOR = "coordinator"
MAX_PORT = 65535


@dataclass(frozen=True, kw_only=True)
class TopologyConfig:
    """What to generate; every field is checked here, before a file is written."""

    clouds: tuple[str, ...]
    job: str
    out: Path
    host: str = "127.0.0.1"
    base_port: int = 14222
    observers: tuple[str, ...] = ("eval",)
    hub_size: int = 3
    client_certs: bool = False
    jetstream_domain: str = "hub"
    leaf_hosts: Mapping[str, str] = field(default_factory=dict, hash=False)  # cloud -> its leaf's host (else ``host``)
    islands: bool = True  # each leaf runs JetStream in a domain named after its cloud

    def __post_init__(self) -> None:
        object.__setattr__(self, "clouds", tuple(self.clouds))
        object.__setattr__(self, "observers", tuple(self.observers))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "leaf_hosts", dict(self.leaf_hosts))
        check_token("job", self.job)
        check_token("JetStream domain", self.jetstream_domain)
        if not self.clouds:
            raise ConfigError("a topology needs at least one cloud")
        names = [*self.clouds, COORDINATOR, *self.observers]
        for name in names:
            check_token("identity", name)
        if len(set(names)) != len(names):
            raise ConfigError(f"cloud, observer and coordinator names must all differ: {names}")
        if self.islands and self.jetstream_domain in self.clouds:
            raise ConfigError(f"a cloud may not be named like the hub's JetStream domain {self.jetstream_domain!r}")
        if self.hub_size < 1:
            raise ConfigError(f"hub_size must be at least 1, got {self.hub_size}")
        _check_host(self.host)
        for cloud, host in self.leaf_hosts.items():
            if cloud not in self.clouds:
                raise ConfigError(f"leaf host given for {cloud!r}, which is not one of the clouds {self.clouds}")
            _check_host(host)
        if not self.base_port >= 1 or self.base_port + self.port_count - 1 > MAX_PORT:
            raise ConfigError(f"ports {self.base_port}..{self.base_port + self.port_count - 1} are not all valid")

    @property
    def port_count(self) -> int:
        return 3 * self.hub_size + len(self.clouds)

    @property
    def replicas(self) -> int:
        """Stream replicas the hub can hold: 3 where there are 3 nodes or more."""
        return min(3, self.hub_size)

    def hub_ports(self, i: int) -> tuple[int, int, int]:
        """(client, cluster, leafnode) ports of hub node ``i``."""
        n = self.hub_size
        return self.base_port + i, self.base_port + n + i, self.base_port + 2 * n + i

    def leaf_port(self, cloud: str) -> int:
        return self.base_port + 3 * self.hub_size + self.clouds.index(cloud)

    def leaf_domain(self, cloud: str) -> str | None:
        """The JetStream domain of ``cloud``'s leaf: the cloud's name in island mode, else none."""
        return cloud if self.islands else None

    def leaf_host(self, cloud: str) -> str:
        """Where ``cloud``'s leaf listens and its workers reach it."""
        return self.leaf_hosts.get(cloud, self.host)


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(label and label.replace("-", "").isalnum() for label in labels):
        raise ConfigError(f"host {host!r} is neither an IP address nor a DNS name")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What every server needs to know about the others, decided before any config is written."""

    config: TopologyConfig
    out: Path
    ca: CertificateAuthority
    ca_file: Path
    users: dict[str, NkeyUser]  # clients: clouds, coordinator, observers
    leaf_users: dict[str, NkeyUser]  # cloud -> the NKEY its leaf node presents to the hub
    routes: dict[str, RouteTls]  # hub node -> its route TLS (empty for a hub of one node)

    def server_tls(self, name: str, host: str) -> TlsFiles:
        """A listener's certificate (client CA, server use only) for ``host`` and loopback."""
        hosts = (host, "localhost", "127.0.0.1", name)
        files = self.ca.issue(name, use=Use.SERVER, hosts=hosts, directory=self.out / "servers" / name)
        return TlsFiles(cert=files.cert, key=files.key, ca=self.ca_file, verify=self.config.client_certs)

    def user(self, name: str) -> User:
        role = Role.COORDINATOR if name == COORDINATOR else Role.CLOUD if name in self.config.clouds else Role.OBSERVER
        cloud = name if role is Role.CLOUD else None
        inbox = self.users[name].inbox_prefix
        permissions = permissions_for(
            role, self.config.job, inbox=inbox, domain=self.config.jetstream_domain, cloud=cloud,
            island=self.config.islands,
        )  # fmt: skip
        return User(public_key=self.users[name].public_key, permissions=permissions)

    def leaf_user(self, cloud: str) -> User:
        """On the hub a leaf is held to what its cloud's workers may do (and receives only their inbox)."""
        inbox = self.users[cloud].inbox_prefix
        permissions = permissions_for(
            Role.LEAF, self.config.job, inbox=inbox, domain=self.config.jetstream_domain, cloud=cloud,
            island=self.config.islands,
        )  # fmt: skip
        return User(public_key=self.leaf_users[cloud].public_key, permissions=permissions)


def generate(config: TopologyConfig) -> Topology:
    """Write the whole topology under ``config.out`` (refusing to overwrite one) and return its map."""
    out = config.out.resolve()
    if (out / TOPOLOGY_FILE).exists() or (out / "identities").exists() or (out / "servers").exists():
        raise ConfigError(f"{out} already holds a topology; generate into an empty directory")
    ca = CertificateAuthority.create(f"fedjet {config.job} CA")
    ca_files = ca.write(out / "ca")
    names = [*config.clouds, COORDINATOR, *config.observers]
    users = {name: create_user(name, out / "identities" / name / "user.nk") for name in names}
    leaf_users = {cloud: _create_leaf_user(cloud, out / "servers" / f"leaf-{cloud}") for cloud in config.clouds}
    routes = _route_certificates(config, out) if config.hub_size > 1 else {}
    plan = _Plan(
        config=config, out=out, ca=ca, ca_file=ca_files.cert, users=users, leaf_users=leaf_users, routes=routes
    )
    servers = [_write_hub(plan, i) for i in range(config.hub_size)]
    servers += [_write_leaf(plan, cloud) for cloud in config.clouds]
    client_certs = {name: _client_cert(plan, name) for name in names} if config.client_certs else {}
    topology = Topology(
        job=config.job,
        servers=tuple(servers),
        hub=tuple(s.url for s in servers if s.role == "hub"),
        leaf={s.cloud: s.url for s in servers if s.role == "leaf" and s.cloud is not None},
        ca=ca_files.cert,
        identities={name: _identity(users[name], client_certs.get(name)) for name in names},
        jetstream_domain=config.jetstream_domain,
        replicas=config.replicas,
        client_certs=config.client_certs,
        leaf_domains={c: d for c in config.clouds if (d := config.leaf_domain(c)) is not None},
    )
    write_file(out / TOPOLOGY_FILE, json.dumps(topology.to_json(), indent=2) + "\n")
    return topology


def route_identity(job: str) -> str:
    """The URI name every route certificate of ``job``'s hub carries; the cluster's one user."""
    return f"urn:fedjet:{job}:route"


def _route_certificates(config: TopologyConfig, out: Path) -> dict[str, RouteTls]:
    """A routes CA used for nothing else, and one route certificate per hub node, in its own folder.

    The routes CA's key goes to ``ca/`` beside the client CA's (keep both offline); each hub
    node gets a copy of the routes CA certificate, so its folder is all it needs.
    """
    routes_ca = CertificateAuthority.create(f"fedjet {config.job} routes CA")
    routes_ca.write(out / "ca", stem="routes-ca")
    identity = route_identity(config.job)
    issued: dict[str, CertFiles] = {}
    for i in range(config.hub_size):
        name, directory = f"hub-{i}", out / "servers" / f"hub-{i}"
        hosts = (config.host, "localhost", "127.0.0.1", name)
        issued[name] = routes_ca.issue(name, use=Use.ROUTE, hosts=hosts, uris=(identity,), directory=directory)
    pinned = tuple(files.pin for files in issued.values())
    return {
        name: RouteTls(
            cert=files.cert,
            key=files.key,
            ca=write_file(files.cert.parent / "routes-ca.pem", routes_ca.pem),
            pinned=pinned,
            identity=identity,
        )
        for name, files in issued.items()
    }


def _create_leaf_user(cloud: str, directory: Path) -> NkeyUser:
    """A leaf's seed lives in a config fragment (0600) that its nats.conf includes."""
    seed = new_user_seed()
    path = write_secret(directory / "leaf-seed.conf", leaf_seed_include(seed))
    return NkeyUser(name=f"leaf-{cloud}", public_key=public_key_of_seed(seed), seed_path=path)


def _write_hub(plan: _Plan, i: int) -> ServerEntry:
    config, name = plan.config, f"hub-{i}"
    client, cluster, leaf = config.hub_ports(i)
    users = [plan.user(n) for n in plan.users] + [plan.leaf_user(cloud) for cloud in config.clouds]
    node = HubNode(
        name=name,
        host=config.host,
        client_port=client,
        cluster_port=cluster,
        leaf_port=leaf,
        routes=tuple(hostport(config.host, config.hub_ports(j)[1]) for j in range(config.hub_size) if j != i),
        cluster_name=f"fedjet-{config.job}",
        store_dir=plan.out / "servers" / name / "jetstream",
        jetstream_domain=config.jetstream_domain,
        tls=plan.server_tls(name, config.host),
        route_tls=plan.routes.get(name),
        users=tuple(users),
    )
    path = write_file(plan.out / "servers" / name / "nats.conf", hub_config(node))
    return ServerEntry(name=name, config=path, role="hub", cloud=None, url=f"tls://{hostport(config.host, client)}")


def _write_leaf(plan: _Plan, cloud: str) -> ServerEntry:
    config, name = plan.config, f"leaf-{cloud}"
    host, port = config.leaf_host(cloud), config.leaf_port(cloud)
    remote = None
    if config.client_certs:  # what the leaf presents to the hub: client use only, no host name
        files = plan.ca.issue(name, use=Use.CLIENT, directory=plan.out / "servers" / name)
        remote = KeyPair(cert=files.cert, key=files.key)
    node = LeafNode(
        name=name,
        host=host,
        client_port=port,
        hub_leaf_urls=tuple(hostport(config.host, config.hub_ports(i)[2]) for i in range(config.hub_size)),
        seed_include=plan.leaf_users[cloud].seed_path.name,
        tls=plan.server_tls(name, host),
        remote_cert=remote,
        users=(plan.user(cloud),),
        store_dir=plan.out / "servers" / name / "jetstream" if config.islands else None,
        jetstream_domain=config.leaf_domain(cloud),
    )
    path = write_file(plan.out / "servers" / name / "nats.conf", leaf_config(node))
    return ServerEntry(name=name, config=path, role="leaf", cloud=cloud, url=f"tls://{hostport(host, port)}")


def _client_cert(plan: _Plan, name: str) -> CertFiles:
    return plan.ca.issue(name, use=Use.CLIENT, directory=plan.out / "identities" / name)


def _identity(user: NkeyUser, cert: CertFiles | None) -> IdentityEntry:
    return IdentityEntry(
        nkey=user.seed_path,
        public_key=user.public_key,
        inbox_prefix=inbox_prefix(user.public_key),
        cert=None if cert is None else cert.cert,
        key=None if cert is None else cert.key,
    )
