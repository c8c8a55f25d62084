"""docker-compose.yml is checked by parsing it (no Docker engine runs here).

The setup service's own command is run for real into a temporary directory, so the mounts are
checked against the files the generator actually writes: every path a server config or a
fedjet command names lies inside a volume that service mounts, and no service but setup sees
another identity's secrets.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedjet.cli import build_parser
from fedjet.config.flags import config_from_args
from fedjet.deploy.command import add_arguments, deploy_command
from fedjet.deploy.manifest import load_topology
from tests.conftest import REPO

OUT = "/deploy"  # the --out of the setup service: every generated path starts here
BUNDLES = "/bundles"
IDENTITY_FLAGS = ("--nkey", "--creds", "--tls-ca", "--tls-cert", "--tls-key", "--js-domain")  # NATS identity
PATH_FLAGS = ("--nkey", "--creds", "--tls-ca", "--tls-cert", "--tls-key", "--keys")


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of each volume (``:ro`` dropped)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def is_nats_server(service: dict[str, Any]) -> bool:
    return service.get("entrypoint") == ["nats-server"]


def fedjet_services() -> dict[str, Any]:
    return {name: s for name, s in services().items() if not is_nats_server(s)}


def flag_values(argv: list[str]) -> dict[str, str]:
    values = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            key, sep, value = token.partition("=")
            values[key] = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
    return values


def cli_commands() -> set[str]:
    """The subcommands the real CLI has now (from its usage line: ``{up,coordinator,...}``)."""
    match = re.search(r"\{([^}]*)\}", build_parser().format_usage())
    assert match is not None
    return set(match.group(1).split(","))


def parse_fedjet(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse with the real CLI; flags it does not know yet may only be the NATS identity flags."""
    parsed, unknown = build_parser().parse_known_args(argv)
    stray = {token.partition("=")[0] for token in unknown if token.startswith("--")}
    assert stray <= set(IDENTITY_FLAGS), f"{argv[0]}: unknown flags {stray}"
    return parsed, unknown


def setup_args() -> argparse.Namespace:
    command = services()["setup"]["command"]
    assert command[:2] == ["deploy", "nats"]
    if "deploy" in cli_commands():
        return build_parser().parse_args(command)
    parser = argparse.ArgumentParser(prog="fedjet deploy nats")  # the flags the CLI will wire
    add_arguments(parser)
    return parser.parse_args(command[2:])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """The setup service's command, run for real with its two folders moved into a temp dir."""
    root = tmp_path_factory.mktemp("compose")
    args = setup_args()
    assert args.out == OUT and args.bundles == BUNDLES
    args.out, args.bundles = str(root / "deploy"), str(root / "bundles")
    assert deploy_command(args) == 0
    assert deploy_command(args) == 0  # --if-missing: a second `docker compose up` finds it done
    return root / "deploy", root / "bundles", load_topology(root / "deploy")


def test_compose_defines_setup_a_hub_a_leaf_per_cloud_coordinator_workers_and_status():
    s = services()
    clouds = setup_args().clouds
    assert {"setup", "nats", "nats-hub-1", "nats-hub-2", "coordinator", "status"} <= set(s)
    assert {f"leaf-{c}" for c in clouds} | {f"worker-{c}" for c in clouds} <= set(s)
    for name, service in s.items():
        if name != "setup":
            assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert s["status"]["profiles"] == ["tools"]  # run on demand, not with `up`
    assert (REPO / "Dockerfile").is_file()


def test_only_setup_mounts_the_private_tree_and_the_ca_bundle_holds_no_private_key(generated):
    _, bundles, _ = generated
    for name, service in services().items():
        sources = set(mounts(service).values())
        assert ("deploy" in sources) == (name == "setup"), name
    assert sorted(p.name for p in (bundles / "ca").iterdir()) == ["ca.pem"]
    aws = sorted(p.name for p in (bundles / "identities" / "aws").iterdir())
    assert aws == ["aws.key", "aws.pub", "azure.pub", "coordinator.pub", "gcp.pub", "user.nk"]  # --secure-agg
    coordinator = sorted(p.name for p in (bundles / "identities" / "coordinator").iterdir())
    assert coordinator == ["aws.pub", "azure.pub", "coordinator.key", "coordinator.pub", "eval.pub", "gcp.pub",
                           "user.nk"]  # fmt: skip


def test_each_volume_is_mounted_where_setup_wrote_it_relative_to_the_generated_tree():
    setup = mounts(services()["setup"])
    relative = {source: target.removeprefix(BUNDLES) for target, source in setup.items() if target != OUT}
    for name, service in services().items():
        if name == "setup":
            continue
        for target, source in mounts(service).items():
            if source.startswith("./"):
                continue  # host data, read-only
            assert target == OUT + relative[source], f"{name} mounts {source} at {target}"


def test_every_service_mounts_only_its_own_identity_or_server():
    clouds = setup_args().clouds
    own = {"coordinator": "id-coordinator", "status": "id-eval"} | {f"worker-{c}": f"id-{c}" for c in clouds}
    own |= {"nats": "hub-0", "nats-hub-1": "hub-1", "nats-hub-2": "hub-2"} | {f"leaf-{c}": f"leaf-{c}" for c in clouds}
    for name, source in own.items():
        sources = {s for s in mounts(services()[name]).values() if not s.startswith("./")}
        assert sources == {source, "ca"}, name


def test_server_configs_name_only_files_their_service_mounts(generated):
    out, _, topology = generated
    for name, service in services().items():
        if not is_nats_server(service):
            continue
        assert service["command"][0] == "-c"
        config = Path(service["command"][1].replace(OUT, str(out), 1))
        assert config.is_file(), f"{name}: {config} was not generated"
        referenced = re.findall(re.escape(str(out)) + r'[^"\s]*', config.read_text())
        targets = mounts(service)
        for path in referenced:
            inside = OUT + path[len(str(out)) :]
            assert any(inside == t or inside.startswith(t + "/") for t in targets), f"{name}: {inside} not mounted"
        if name != "nats":
            assert service["network_mode"] == "service:nats"  # one host, as the port layout assumes
    assert {s["command"][1] for s in services().values() if is_nats_server(s)} == {
        f"{OUT}/servers/{server.name}/nats.conf" for server in topology.servers
    }


def test_every_fedjet_command_parses_with_the_real_cli_and_agrees_with_the_topology(generated):
    _, _, topology = generated
    commands = cli_commands()
    parsed = {}
    for name, service in fedjet_services().items():
        if name == "setup" or service["command"][0] not in commands:
            continue  # `status` before the CLI has it
        parsed[name], _ = parse_fedjet(service["command"])
    job = config_from_args(parsed["coordinator"])
    assert parsed["coordinator"].command == "coordinator" and job.codec == "topk:0.01+int8"
    assert job.job == topology.job == setup_args().job
    assert tuple(job.clouds) == tuple(topology.leaf) == setup_args().clouds
    workers = {n: p for n, p in parsed.items() if n.startswith("worker-")}
    assert {p.cloud for p in workers.values()} == set(job.clouds)
    assert all(p.job == job.job for p in workers.values())
    urls = {n: flag_values(s["command"])["--nats"] for n, s in fedjet_services().items() if n != "setup"}
    assert urls["coordinator"] == topology.hub[0] and urls["status"] == topology.hub[0]
    for cloud in job.clouds:
        assert urls[f"worker-{cloud}"] == topology.leaf[cloud]  # each worker on its own cloud's leaf
    published = services()["nats"]["ports"][0].rsplit(":", 1)[1]
    assert f":{published}" in topology.hub[0]


def test_identity_flags_point_into_the_services_own_mounts(generated):
    out, _, topology = generated
    who = {"coordinator": "coordinator", "status": "eval"} | {f"worker-{c}": c for c in topology.leaf}
    for name, identity in who.items():
        service = fedjet_services()[name]
        flags = flag_values(service["command"])
        assert flags["--nkey"] == f"{OUT}/identities/{identity}/user.nk"
        assert flags["--tls-ca"] == f"{OUT}/ca/ca.pem"
        assert flags["--keys"] == f"{OUT}/identities/{identity}"
        assert flags["--js-domain"] == topology.jetstream_domain
        targets = mounts(service)
        for flag in PATH_FLAGS:
            if flag in flags:
                assert any(flags[flag] == t or flags[flag].startswith(t + "/") for t in targets), (name, flag)
                assert Path(flags[flag].replace(OUT, str(out), 1)).exists(), (name, flag)


def test_identity_flags_parse_once_the_cli_has_them():
    for name, identity in (("coordinator", "coordinator"), ("worker-aws", "aws")):
        parsed, unknown = parse_fedjet(fedjet_services()[name]["command"])
        assert unknown == [], f"{name}: the CLI does not know {unknown}"
        assert parsed.nkey == f"{OUT}/identities/{identity}/user.nk"
        assert parsed.tls_ca == f"{OUT}/ca/ca.pem"
        assert parsed.js_domain == "hub"


def test_every_jetstream_store_is_on_a_writable_mount(generated):
    """Hub nodes and, in island mode, every leaf keep a JetStream store: nats-server must be able
    to write it (a read-only mount would stop the leaf at start)."""
    out, _, topology = generated
    stores = 0
    for name, service in services().items():
        if not is_nats_server(service):
            continue
        config = Path(service["command"][1].replace(OUT, str(out), 1)).read_text()
        found = re.search(r'store_dir: "([^"]+)"', config)
        if found is None:
            continue
        stores += 1
        inside = OUT + found.group(1)[len(str(out)) :]
        writable = [spec.split(":")[1] for spec in service["volumes"] if not spec.split("#")[0].strip().endswith(":ro")]
        assert any(inside.startswith(target + "/") for target in writable), f"{name}: {inside} is read-only"
    assert stores == 3 + len(topology.leaf)  # three hub nodes and a leaf per cloud


def test_the_gpu_override_makes_aws_a_two_gpu_node_with_the_same_flags_plus_ranks():
    """``docker compose -f docker-compose.yml -f docker-compose.gpu.yml``: compose replaces a
    service's command wholesale, so the override repeats it; it must be the base command plus
    the device and the ranks, parse with the real CLI, and reserve as many GPUs as ranks."""
    override = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]
    assert set(override) == {"worker-aws"}
    gpu, base = override["worker-aws"]["command"], services()["worker-aws"]["command"]
    assert gpu[: len(base)] == base and gpu[len(base) :] == ["--device=cuda", "--nproc-per-node=2"]
    parsed, _ = parse_fedjet(gpu)
    assert parsed.nproc_per_node == 2 and parsed.device == "cuda"
    (devices,) = override["worker-aws"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices["count"] == parsed.nproc_per_node and "gpu" in devices["capabilities"]
    assert 'ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"' in (REPO / "Dockerfile").read_text()
