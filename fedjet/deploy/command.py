"""``fedjet deploy nats``: generate a locked-down NATS topology, and hand each machine only its part.

::

    fedjet deploy nats --clouds aws,gcp,azure --job J --out DIR
                       [--host H] [--leaf-hosts aws=H1,gcp=H2] [--base-port P] [--hub-size N]
                       [--observers eval]
                       [--client-certs] [--js-domain hub] [--no-islands]
                       [--with-keys | --public-keys KDIR] [--bundles BDIR] [--if-missing]

``--clouds``        the clouds; each gets a leaf node and one NKEY user (required)
``--job``           the job the permissions are written for (required)
``--out``           an empty directory for the topology (see :mod:`fedjet.deploy.topology`)
``--host``          where the servers listen and clients find them (default 127.0.0.1; in
                    docker compose the name of the NATS service)
``--leaf-hosts``    each leaf node's own host, ``cloud=host`` pairs (a cloud not named uses
                    ``--host``); a leaf's certificate names its own host, never the hub's
``--base-port``     first of ``3 * hub_size + len(clouds)`` consecutive ports (default 14222)
``--hub-size``      hub nodes (default 3: streams can keep 3 replicas)
``--observers``     read-only identities such as ``fedjet status`` (default eval)
``--client-certs``  servers also require a client certificate from the CA
``--js-domain``     the hub's JetStream domain, used by every client (default hub)
``--no-islands``    leaves without JetStream (by default each leaf runs JetStream in a domain
                    named after its cloud, so its worker trains on through a cut link: island mode)
``--with-keys``     also make every party's fedjet key pair here (``fedjet keys generate``) and put
                    them in the identity folders: a cloud gets its ``NAME.key`` and ``NAME.pub``,
                    ``coordinator.pub`` and every other cloud's ``.pub`` (``--secure-agg`` checks
                    every member's signed messages); an observer its pair and
                    ``coordinator.pub``; the coordinator ``coordinator.key`` and every member's
                    ``.pub``. The one-machine convenience (docker compose, a demo): whoever runs
                    it has held every party's secret, so updates signed with them prove nothing
                    about who sent them against that person
``--public-keys KDIR`` the production path: each party ran ``fedjet keys generate --cloud NAME``
                    (``--coordinator``) on its own machine and handed out only ``NAME.pub``,
                    collected in KDIR; the identity folders get the ``.pub`` files each one
                    needs (as above) and no secret - each machine adds its own ``NAME.key``
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
from fedjet.keystore import load_public, write_public

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "leaf_hosts": None,
    "base_port": 14222,
    "hub_size": 3,
    "observers": ("eval",),
    "client_certs": False,
    "js_domain": "hub",
    "no_islands": False,
    "with_keys": False,
    "public_keys": None,
    "bundles": None,
    "if_missing": False,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fedjet deploy nats`` (the module docstring says what each does)."""
    parser.add_argument("--clouds", type=parse_names, required=True, help="e.g. aws,gcp,azure")
    parser.add_argument("--job", required=True, help="the job the permissions are written for")
    parser.add_argument("--out", required=True, help="an empty directory for the topology")
    parser.add_argument("--host", default=DEFAULTS["host"], help="where servers listen and clients find them")
    parser.add_argument(
        "--leaf-hosts", type=parse_hosts, default=None, metavar="CLOUD=HOST,...", help="each leaf's own host"
    )
    parser.add_argument("--base-port", type=int, default=DEFAULTS["base_port"], help="first of the consecutive ports")
    parser.add_argument("--hub-size", type=int, default=DEFAULTS["hub_size"], help="hub nodes (default 3)")
    parser.add_argument("--observers", type=parse_names, default=DEFAULTS["observers"], help="read-only identities")
    parser.add_argument("--client-certs", action="store_true", help="servers require client certificates too")
    parser.add_argument("--js-domain", default=DEFAULTS["js_domain"], help="the hub's JetStream domain")
    parser.add_argument(
        "--no-islands", action="store_true", help="leaves without JetStream (no island mode: a cut link stops a cloud)"
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--with-keys",
        action="store_true",
        help="also make every party's fedjet key pair HERE (one-machine demo: this operator holds every secret)",
    )
    keys.add_argument(
        "--public-keys",
        default=None,
        metavar="KDIR",
        help="give each identity the .pub files it needs from KDIR (each party made its own pair: production)",
    )
    parser.add_argument("--bundles", default=None, metavar="BDIR", help="copy each machine's part to BDIR/...")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if DIR/topology.json exists")


def parse_hosts(text: str) -> dict[str, str]:
    """``aws=10.0.1.5,gcp=leaf.gcp.example.org`` as a dict (the generator checks names and clouds)."""
    hosts: dict[str, str] = {}
    for part in text.split(","):
        cloud, sep, host = (p.strip() for p in part.partition("="))
        if not sep or not cloud or not host or cloud in hosts:
            raise argparse.ArgumentTypeError(f"--leaf-hosts {text!r}: expected cloud=host pairs, each cloud once")
        hosts[cloud] = host
    return hosts


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
        leaf_hosts=dict(opt["leaf_hosts"] or {}),
        base_port=int(opt["base_port"]),
        observers=_names(opt["observers"]),
        hub_size=int(opt["hub_size"]),
        client_certs=bool(opt["client_certs"]),
        jetstream_domain=opt["js_domain"],
        islands=not opt["no_islands"],
    )
    if opt["with_keys"] and opt["public_keys"] is not None:
        raise ConfigError("--with-keys makes every key here; --public-keys takes the parties' own: give one")
    if opt["public_keys"] is not None:  # a missing or foreign .pub fails before anything is written
        read_public_keys(Path(opt["public_keys"]), (*config.clouds, *config.observers))
    topology = generate(config)
    if opt["with_keys"]:
        write_fedjet_keys(topology, config.clouds, config.observers)
    elif opt["public_keys"] is not None:
        write_public_keys(topology, config.clouds, config.observers, Path(opt["public_keys"]))
    if opt["bundles"] is not None:
        write_bundles(topology, Path(opt["bundles"]))
    print(describe(topology, with_keys=bool(opt["with_keys"]) or opt["public_keys"] is not None))
    if opt["with_keys"]:
        print(
            "note: every party's secret key was made on this machine (a one-machine setup); in production each "
            "party runs 'fedjet keys generate --cloud NAME' itself and you deploy with --public-keys"
        )
    return 0


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return parse_names(value) if isinstance(value, str) else tuple(value)


def public_keys_needed(name: str, clouds: tuple[str, ...], observers: tuple[str, ...]) -> tuple[str, ...]:
    """Whose ``.pub`` identity ``name`` needs: the coordinator every member's (to check their
    updates' signatures), a cloud the coordinator's and every cloud's (``--secure-agg`` checks
    each member's signed messages; its own too), an observer the coordinator's and its own."""
    if name == COORDINATOR:
        return (COORDINATOR, *clouds, *observers)
    if name in clouds:
        return (COORDINATOR, *clouds)
    return (COORDINATOR, name)


def write_fedjet_keys(topology: Topology, clouds: tuple[str, ...], observers: tuple[str, ...]) -> None:
    """Every party's PyNaCl pair made here, each identity getting only its own secret and the
    public keys it needs (see :func:`public_keys_needed`)."""
    members = (*clouds, *observers)
    folders = {name: entry.nkey.parent for name, entry in topology.identities.items()}
    scratch = Path(tempfile.mkdtemp(prefix=".fedjet-keys-", dir=folders[COORDINATOR].parent))
    try:
        generate_keys(scratch, members)
        for name in (COORDINATOR, *members):
            write_secret(folders[name] / f"{name}.key", (scratch / f"{name}.key").read_bytes())
            for peer in public_keys_needed(name, clouds, observers):
                write_file(folders[name] / f"{peer}.pub", (scratch / f"{peer}.pub").read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_public_keys(source: Path, members: tuple[str, ...]) -> dict[str, Any]:
    """Every party's ``.pub`` from ``source``, read and checked (before anything is generated)."""
    missing = [f"{n}.pub" for n in (COORDINATOR, *members) if not (source / f"{n}.pub").is_file()]
    if missing:
        raise ConfigError(
            f"{source} lacks {', '.join(missing)}: each party runs 'fedjet keys generate' and hands it out"
        )
    return {name: load_public(source, name) for name in (COORDINATOR, *members)}


def write_public_keys(
    topology: Topology, clouds: tuple[str, ...], observers: tuple[str, ...], source: Path
) -> list[Path]:
    """The ``.pub`` files each identity needs, from the ones the parties handed out into
    ``source``; every one is read and checked before any is written, and no secret is touched."""
    members = (*clouds, *observers)
    folders = {name: entry.nkey.parent for name, entry in topology.identities.items()}
    keys = read_public_keys(source, members)
    written = []
    for name in (COORDINATOR, *members):
        for peer in public_keys_needed(name, clouds, observers):
            written.append(write_public(folders[name], keys[peer]))
    return written


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
    if topology.leaf_domains:
        lines.append(
            "island mode: each leaf runs JetStream in its cloud's domain "
            f"({', '.join(f'{c}={d}' for c, d in topology.leaf_domains.items())}); workers find it themselves"
        )
    return "\n".join(lines)
