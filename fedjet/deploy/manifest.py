"""``topology.json``: the machine-readable map of a generated topology, and reading it back.

::

    {"job": J, "servers": [{"name", "config", "role": "hub"|"leaf", "cloud", "url"}],
     "hub": [client URLs], "leaf": {cloud: client URL}, "ca": path,
     "identities": {name: {"nkey": seed path, "public_key", "inbox_prefix", ["cert", "key"]}},
     "jetstream_domain": D, "replicas": R, "tls": true, "client_certs": bool,
     "leaf_domains": {cloud: its leaf's JetStream domain (island mode; absent: no JetStream)}}

URLs are ``tls://HOST:PORT`` (nats-py then insists on TLS; hand ``nats.connect`` a list, as
``urls_for`` gives, not a tuple). Paths are absolute. Clients use the JetStream API of
``jetstream_domain`` (``nc.jetstream(domain=...)``) wherever they connect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedjet.broker.auth import ClientAuth
from fedjet.errors import ConfigError

TOPOLOGY_FILE = "topology.json"


@dataclass(frozen=True, kw_only=True)
class ServerEntry:
    name: str
    config: Path
    role: str  # "hub" | "leaf"
    cloud: str | None
    url: str


@dataclass(frozen=True, kw_only=True)
class IdentityEntry:
    nkey: Path
    public_key: str
    inbox_prefix: str
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The generated map (``topology.json``), with the helpers that clients need from it."""

    job: str
    servers: tuple[ServerEntry, ...]
    hub: tuple[str, ...]
    leaf: Mapping[str, str]
    ca: Path
    identities: Mapping[str, IdentityEntry]
    jetstream_domain: str
    replicas: int
    tls: bool = True
    client_certs: bool = False
    leaf_domains: Mapping[str, str] = field(default_factory=dict)  # island-capable leaves

    def urls_for(self, identity: str) -> list[str]:
        """Where ``identity`` connects: its cloud's leaf for a cloud, the hub for everyone else."""
        if identity not in self.identities:
            raise ConfigError(f"no identity {identity!r} in this topology (have {sorted(self.identities)})")
        return [self.leaf[identity]] if identity in self.leaf else list(self.hub)

    def client_auth(self, identity: str) -> ClientAuth:
        """``identity``'s seed, the CA, and its client certificate when the servers require one."""
        if identity not in self.identities:
            raise ConfigError(f"no identity {identity!r} in this topology (have {sorted(self.identities)})")
        entry = self.identities[identity]
        return ClientAuth(
            nkey=str(entry.nkey),
            tls_ca=str(self.ca),
            tls_cert=None if entry.cert is None else str(entry.cert),
            tls_key=None if entry.key is None else str(entry.key),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "servers": [_server_json(server) for server in self.servers],
            "hub": list(self.hub),
            "leaf": dict(self.leaf),
            "ca": str(self.ca),
            "identities": {name: _identity_json(entry) for name, entry in self.identities.items()},
            "jetstream_domain": self.jetstream_domain,
            "replicas": self.replicas,
            "tls": self.tls,
            "client_certs": self.client_certs,
            "leaf_domains": dict(self.leaf_domains),
        }


def _server_json(server: ServerEntry) -> dict[str, Any]:
    return {
        "name": server.name,
        "config": str(server.config),
        "role": server.role,
        "cloud": server.cloud,
        "url": server.url,
    }


def _identity_json(entry: IdentityEntry) -> dict[str, Any]:
    body: dict[str, Any] = {"nkey": str(entry.nkey), "public_key": entry.public_key, "inbox_prefix": entry.inbox_prefix}
    if entry.cert is not None and entry.key is not None:
        body |= {"cert": str(entry.cert), "key": str(entry.key)}
    return body


def load_topology(path: str | Path) -> Topology:
    """Read ``topology.json`` (or the directory holding it) back into a :class:`Topology`."""
    path = Path(path)
    if path.is_dir():
        path = path / TOPOLOGY_FILE
    try:
        body = json.loads(path.read_text())
        return _topology_from_json(body)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a fedjet topology: {type(e).__name__}: {e}") from e


def _topology_from_json(body: dict[str, Any]) -> Topology:
    servers = tuple(
        ServerEntry(name=s["name"], config=Path(s["config"]), role=s["role"], cloud=s["cloud"], url=s["url"])
        for s in body["servers"]
    )
    identities = {
        name: IdentityEntry(
            nkey=Path(i["nkey"]),
            public_key=i["public_key"],
            inbox_prefix=i["inbox_prefix"],
            cert=Path(i["cert"]) if "cert" in i else None,
            key=Path(i["key"]) if "key" in i else None,
        )
        for name, i in body["identities"].items()
    }
    return Topology(
        job=body["job"],
        servers=servers,
        hub=tuple(body["hub"]),
        leaf=dict(body["leaf"]),
        ca=Path(body["ca"]),
        identities=identities,
        jetstream_domain=body["jetstream_domain"],
        replicas=int(body["replicas"]),
        tls=bool(body.get("tls", True)),
        client_certs=bool(body.get("client_certs", False)),
        leaf_domains=dict(body.get("leaf_domains", {})),
    )
