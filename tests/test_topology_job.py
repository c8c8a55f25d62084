"""A real job on the generated topology: a 3-node TLS hub with R3 JetStream, a leaf node per
cloud, NKEY identities. The coordinator connects to the hub, each worker to its own cloud's leaf;
one hub node is killed mid-run; the job completes and replays with 0 mismatches."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from fedjet.keystore import generate as generate_keys
from tests.conftest import FedjetProcess, run_fedjet
from tests.topology_helpers import CLOUDS, JOB, _config, _wait_leaves, running

pytestmark = pytest.mark.e2e


def identity(topology, name: str) -> list[str]:
    return [
        "--nkey", str(topology.identities[name].nkey), "--tls-ca", str(topology.ca),
        "--js-domain", topology.jetstream_domain,
    ]  # fmt: skip


def start(*args: str, log: Path) -> FedjetProcess:
    return FedjetProcess(*args, log=log)


def start_workers(topology, keys: Path, data_dir: Path, tmp_path: Path) -> list[FedjetProcess]:
    """A worker per cloud, each on its own cloud's leaf, logging to ``<cloud>.log``."""
    return [
        start(
            "worker",
            "--nats",
            topology.leaf[cloud],
            *identity(topology, cloud),
            "--keys",
            str(keys),
            "--job",
            JOB,
            "--cloud",
            cloud,
            "--deal",
            "--data",
            str(data_dir),
            log=tmp_path / f"{cloud}.log",
        )
        for cloud in CLOUDS
    ]


def wait_for_version_1(status: list[str], coordinator: FedjetProcess, tmp_path: Path) -> None:
    """Until ``fedjet status`` shows version 1 (at most 120 s), the coordinator alive meanwhile."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill a hub node once version 1 is out
        shown = run_fedjet(*status, "--json", timeout=60)
        if shown.returncode == 0 and (json.loads(shown.stdout).get("head") or {}).get("version", 0) >= 1:
            break
        assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()[-3000:]
        time.sleep(1)


def test_a_job_across_hub_and_leaves_survives_a_hub_node_and_replays(tmp_path, data_dir):
    import asyncio

    keys = tmp_path / "keys"
    generate_keys(keys, [*CLOUDS, "eval"])
    with running(_config(tmp_path, CLOUDS), tmp_path) as cluster:
        topology = cluster.topology
        asyncio.run(_wait_leaves(topology))
        hub = ",".join(topology.hub)
        train = ["--local-steps", "4", "--batch-size", "4", "--seq-len", "64"]
        coordinator = start(
            "coordinator", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB,
            "--clouds", ",".join(CLOUDS), "--rounds", "4", *train, log=tmp_path / "coordinator.log",
        )  # fmt: skip
        procs = [coordinator]
        workers = start_workers(topology, keys, data_dir, tmp_path)
        procs += workers
        try:
            status = ["status", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB]
            wait_for_version_1(status, coordinator, tmp_path)  # then kill a hub node
            hub_nodes = [s.name for s in topology.servers if s.role == "hub"]
            cluster.stop(hub_nodes[-1], signal.SIGKILL)
            for name, proc in [("coordinator", coordinator), *zip(CLOUDS, workers, strict=True)]:
                try:
                    proc.wait(timeout=240)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        finally:  # nothing this test started outlives it
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        verify = run_fedjet(
            "replay", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB,
            "--verify", "--no-progress", timeout=120,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        summary = json.loads(verify.stdout.strip().splitlines()[-1])
        assert summary == {"versions": 4, "mismatches": 0, "first_mismatch": None}
        final = json.loads(run_fedjet(*status, "--json", timeout=60).stdout)
        assert final["head"]["version"] == 4 and final["head"]["final"]
