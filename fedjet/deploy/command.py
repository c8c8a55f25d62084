"""``fedjet deploy nats``: generate a locked-down NATS topology, and hand each machine only its part.

::

    fedjet deploy nats --clouds aws,gcp,azure --job J --out DIR
                       [--host H] [--base-port P] [--hub-size N] [--observers eval]
                       [--client-certs] [--js-domain hub]
                       [--with-keys] [--bundles BDIR] [--if-missing]

``--clouds``        the clouds; each gets a leaf node and one NKEY user (required)
``--job``           the job the permissions are written for (required)
``--out``           an empty directory for the topology (see :mod:`fedjet.deploy.topology`)
``--host``          where the servers listen and clients find them (default 127.0.0.1; in
                    docker compose the name of the NATS service)
``--base-port``     first of ``3 * hub_size + len(clouds)`` consecutive ports (default 14222)
``--hub-size``      hub nodes (default 3: streams can keep 3 replicas)
``--observers``     read-only identities such as ``fedjet status`` (default eval)
``--client-certs``  servers also require a client certificate from the CA
``--js-domain``     the hub's JetStream domain, used by every client (default hub)
``--with-keys``     also write fedjet's own key pairs (``fedjet keys generate``) into the identity
                    folders: a cloud or observer gets its ``NAME.key`` and ``coordinator.pub``,
                    the coordinator ``coordinator.key`` and every member's ``.pub``
``--bundles BDIR``  also copy what each container or machine needs into its own folder:
                    ``BDIR/ca/ca.pem``, ``BDIR/servers/<server>/``, ``BDIR/identities/<name>/``
                    (the CA's private key is never copied)
``--if-missing``    do nothing when ``DIR/topology.json`` exists (a one-shot setup run twice)

Keys and seeds are created with mode 0600 and never overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedjet.codecs.crypto import COORDINATOR
from fedjet.config.flags import parse_names
from fedjet.deploy.files import write_file, write_secret
from fedjet.deploy.manifest import TOPOLOGY_FILE, Topology
from fedjet.deploy.topology import TopologyConfig, generate
from fedjet.errors import ConfigError
from fedjet.keystore import generate as generate_keys

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "base_port": 14222,
    "hub_size": 3,
    "observers": ("eval",),
    "client_certs": False,
    "js_domain": "hub",
    "with_keys": False,
    "bundles": None,
    "if_missing": False,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fedjet deploy nats`` (the module docstring says what each does)."""
    parser.add_argument("--clouds", type=parse_names, required=True, help="e.g. aws,gcp,azure")
    parser.add_argument("--job", required=True, help="the job the permissions are written for")
    parser.add_argument("--out", required=True, help="an empty directory for the topology")
    parser.add_argument("--host", default=DEFAULTS["host"], help="where servers listen and clients find them")
    parser.add_argument("--base-port", type=int, default=DEFAULTS["base_port"], help="first of the consecutive ports")
    parser.add_argument("--hub-size", type=int, default=DEFAULTS["hub_size"], help="hub nodes (default 3)")
    parser.add_argument("--observers", type=parse_names, default=DEFAULTS["observers"], help="read-only identities")
    parser.add_argument("--client-certs", action="store_true", help="servers require client certificates too")
    parser.add_argument("--js-domain", default=DEFAULTS["js_domain"], help="the hub's JetStream domain")
    parser.add_argument("--with-keys", action="store_true", help="also write fedjet's key pairs per identity")
    parser.add_argument("--bundles", default=None, metavar="BDIR", help="copy each machine's part to BDIR/...")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if DIR/topology.json exists")


def deploy_command(args: Any) -> int:
    """Run ``fedjet deploy nats`` from parsed flags (any object with the attributes above)."""
    opt = {key: getattr(args, key, default) for key, default in DEFAULTS.items()}
    out = Path(args.out)
    if opt["if_missing"] and (out / TOPOLOGY_FILE).is_file():
        print(f"a topology is already in {out}; leaving it")
        return 0
    config = TopologyConfig(
        clouds=_names(args.clouds),
        job=args.job,
        out=out,
        host=opt["host"],
        base_port=int(opt["base_port"]),
        observers=_names(opt["observers"]),
        hub_size=int(opt["hub_size"]),
        client_certs=bool(opt["client_certs"]),
        jetstream_domain=opt["js_domain"],
    )
    topology = generate(config)
    if opt["with_keys"]:
        write_fedjet_keys(topology, config.clouds, config.observers)
    if opt["bundles"] is not None:
        write_bundles(topology, Path(opt["bundles"]))
    print(describe(topology, with_keys=bool(opt["with_keys"])))
    return 0


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return parse_names(value) if isinstance(value, str) else tuple(value)


def write_fedjet_keys(topology: Topology, clouds: tuple[str, ...], observers: tuple[str, ...]) -> None:
    """fedjet's PyNaCl keys, each identity getting only what it needs (see the module docstring)."""
    members = (*clouds, *observers)
    folders = {name: entry.nkey.parent for name, entry in topology.identities.items()}
    scratch = Path(tempfile.mkdtemp(prefix=".fedjet-keys-", dir=folders[COORDINATOR].parent))
    try:
        generate_keys(scratch, members)
        wanted = {COORDINATOR: [f"{COORDINATOR}.key", *(f"{m}.pub" for m in members)]}
        wanted |= {m: [f"{m}.key", f"{COORDINATOR}.pub"] for m in members}
        for name, files in wanted.items():
            for file in files:
                data = (scratch / file).read_bytes()
                if file.endswith(".key"):
                    write_secret(folders[name] / file, data)
                else:
                    write_file(folders[name] / file, data)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_bundles(topology: Topology, bundles: Path) -> list[Path]:
    """One folder per recipient under ``bundles``, mirroring the generated tree (modes kept).

    A container mounts its bundle where the generated configs expect it (``ca/``,
    ``servers/<name>/``, ``identities/<name>/`` under the ``--out`` path), so no path is rewritten.
    """
    sources = {Path("ca") / "ca.pem": topology.ca}
    sources |= {Path("servers") / s.name: s.config.parent for s in topology.servers}
    sources |= {Path("identities") / name: entry.nkey.parent for name, entry in topology.identities.items()}
    written = []
    for relative, source in sources.items():
        target = bundles / relative
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            raise ConfigError(f"{target} is not empty; not overwriting a bundle")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        written.append(target)
    return written


def describe(topology: Topology, *, with_keys: bool) -> str:
    """What was written and how each part starts: printed after generating."""
    lines = [f"topology for job {topology.job} in {topology.ca.parent.parent / TOPOLOGY_FILE}"]
    for server in topology.servers:
        where = f"cloud {server.cloud}" if server.cloud else "hub"
        lines.append(f"  {where:<12} nats-server -c {server.config}   (clients: {server.url})")
    keys = "" if not with_keys else " --keys DIR"
    lines.append("clients (DIR = identities/<name>/):")
    for name in topology.identities:
        url = ",".join(topology.urls_for(name))
        lines.append(f"  {name:<12} --nats {url} --nkey DIR/user.nk --tls-ca {topology.ca}{keys}")
    lines.append(f"every client uses the JetStream domain {topology.jetstream_domain!r}")
    return "\n".join(lines)
