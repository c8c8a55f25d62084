"""nats-server configuration text for hub nodes and leaf nodes (pure: data in, text out).

Hub nodes run JetStream in the domain ``jetstream_domain``. An island-capable leaf (the
default) runs JetStream in a domain of its own, named after its cloud: its cloud's updates wait
in it while the link to the hub is down (see :mod:`fedjet.deploy.permissions`). A leaf server
always denies the plain JetStream API (``$JS.API.>``, ``$KV.>``) across its
connection to the hub, so clients behind a leaf reach the hub's JetStream through the
domain-qualified API, ``$JS.<domain>.API.>``, which the hub maps back onto its own API.

Routes (the hub's cluster port) trust only the routes CA, accept only the pinned public keys of
the hub nodes' route certificates, and authorize only a certificate that carries the route
identity (``verify_and_map`` against the cluster's one user). Clients and leaf nodes never see
that CA; nothing signed by the client CA, which signs every certificate a cloud holds, passes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedjet.deploy.permissions import Permissions

LEAF_SEED_VARIABLE = "fedjet_leaf_seed"


@dataclass(frozen=True)
class Raw:
    """A config token written as is (a variable reference), never quoted."""

    text: str


Value = str | int | bool | Path | Raw | Sequence["Value"] | Mapping[str, "Value"]


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """A server's certificate, its key, the CA it trusts and whether peers must present a certificate."""

    cert: Path
    key: Path
    ca: Path
    verify: bool


@dataclass(frozen=True, kw_only=True)
class RouteTls:
    """A hub node's route certificate, the routes CA, the pins of every hub node's route key,
    and the identity (a URI name in each route certificate) that the cluster authorizes."""

    cert: Path
    key: Path
    ca: Path
    pinned: tuple[str, ...]
    identity: str


@dataclass(frozen=True, kw_only=True)
class KeyPair:
    """A client certificate and its key."""

    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class User:
    public_key: str
    permissions: Permissions


@dataclass(frozen=True, kw_only=True)
class HubNode:
    name: str
    host: str
    client_port: int
    cluster_port: int
    leaf_port: int
    routes: tuple[str, ...]  # host:port of the other nodes' cluster listeners
    cluster_name: str
    store_dir: Path
    jetstream_domain: str
    tls: TlsFiles  # clients and leaf nodes
    route_tls: RouteTls | None  # None for a hub of one node (no cluster)
    users: tuple[User, ...]  # clients and the leaf nodes (leaf connections use the same users)


@dataclass(frozen=True, kw_only=True)
class LeafNode:
    name: str
    host: str
    client_port: int
    hub_leaf_urls: tuple[str, ...]  # host:port of every hub node's leafnode listener
    seed_include: str  # file next to the config that defines the leaf's seed variable
    tls: TlsFiles  # what the leaf's own clients see
    remote_cert: KeyPair | None  # a client certificate presented to the hub, where the hub requires one
    users: tuple[User, ...]
    store_dir: Path | None = None  # island mode: the leaf's own JetStream store ...
    jetstream_domain: str | None = None  # ... in this domain (the cloud's name)


def hub_config(node: HubNode) -> str:
    body: dict[str, Value] = {
        "server_name": node.name,
        "host": node.host,
        "port": node.client_port,
        "tls": _tls(node.tls),
        "jetstream": {"store_dir": node.store_dir, "domain": node.jetstream_domain},
    }
    if node.routes:  # a hub of one node runs JetStream unclustered
        if node.route_tls is None:
            raise ValueError(f"{node.name} has routes but no route certificate")
        body["cluster"] = _cluster(node, node.route_tls)
    # no_advertise: a leaf's remote lists every hub node already, and an advertised address (the
    # hub's own view of itself) may be one the leaf cannot or must not reach (a relay, a NAT)
    body["leafnodes"] = {"host": node.host, "port": node.leaf_port, "no_advertise": True, "tls": _tls(node.tls)}
    body["authorization"] = {"users": [user_block(user) for user in node.users]}
    return f"# hub node {node.name}: start with  nats-server -c THIS_FILE\n{render(body)}"


def _cluster(node: HubNode, tls: RouteTls) -> dict[str, Value]:
    """Mutual TLS against the routes CA, pinned keys, and the route identity as the one route user."""
    return {
        "name": node.cluster_name,
        "host": node.host,
        "port": node.cluster_port,
        "routes": [f"nats-route://{route}" for route in node.routes],
        "tls": {
            "cert_file": tls.cert,
            "key_file": tls.key,
            "ca_file": tls.ca,
            "verify_and_map": True,  # a peer certificate is required, verified, and mapped to a user
            "pinned_certs": list(tls.pinned),
        },
        "authorization": {"user": tls.identity},
    }


def leaf_config(node: LeafNode) -> str:
    remote_tls: dict[str, Value] = {"ca_file": node.tls.ca}
    if node.remote_cert is not None:
        remote_tls |= {"cert_file": node.remote_cert.cert, "key_file": node.remote_cert.key}
    remote: dict[str, Value] = {
        "urls": [f"nats-leaf://{url}" for url in node.hub_leaf_urls],
        "nkey": Raw(f"${LEAF_SEED_VARIABLE}"),
        "tls": remote_tls,
    }
    body: dict[str, Value] = {
        "server_name": node.name,
        "host": node.host,
        "port": node.client_port,
        "tls": _tls(node.tls),
        "authorization": {"users": [user_block(user) for user in node.users]},
        "leafnodes": {"remotes": [remote]},
    }
    kind = "no JetStream"
    if node.store_dir is not None and node.jetstream_domain is not None:
        body["jetstream"] = {"store_dir": node.store_dir, "domain": node.jetstream_domain}
        kind = f"island-capable, JetStream domain {node.jetstream_domain}"
    header = f"# leaf node {node.name} ({kind}): start with  nats-server -c THIS_FILE\n"
    return f"{header}include {json.dumps(node.seed_include)}\n{render(body)}"


def leaf_seed_include(seed: bytes) -> str:
    """The secret part of a leaf config, kept in its own 0600 file so the config can be shared."""
    return f"{LEAF_SEED_VARIABLE}: {json.dumps(seed.decode().strip())}\n"


def _tls(tls: TlsFiles) -> dict[str, Value]:
    return {"cert_file": tls.cert, "key_file": tls.key, "ca_file": tls.ca, "verify": tls.verify}


def user_block(user: User) -> dict[str, Value]:
    return {
        "nkey": user.public_key,
        "permissions": {
            "publish": _allow(user.permissions.publish),
            "subscribe": _allow(user.permissions.subscribe),
        },
    }


def _allow(subjects: tuple[str, ...]) -> dict[str, Value]:
    """An empty allow list means *no restriction* to nats-server: write "deny everything" instead."""
    return {"allow": list(subjects)} if subjects else {"deny": [">"]}


def render(body: Mapping[str, Value], indent: int = 0) -> str:
    """nats-server's config syntax: ``key: value``, ``key { ... }``, lists in brackets, quoted strings."""
    pad = "  " * indent
    lines = []
    for key, value in body.items():
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{\n{render(value, indent + 1)}{pad}}}")
        else:
            lines.append(f"{pad}{key}: {_scalar(value, indent)}")
    return "".join(f"{line}\n" for line in lines)


def _scalar(value: Value, indent: int) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # quoted: "$JS.API.>" is a subject, not a variable
    if isinstance(value, Mapping):
        return "{\n" + render(value, indent + 1) + "  " * indent + "}"
    items = [_scalar(item, indent + 1) for item in value]
    if not items:
        return "[]"
    inner = "  " * (indent + 1)
    return "[\n" + "".join(f"{inner}{item}\n" for item in items) + "  " * indent + "]"
