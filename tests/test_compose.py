"""docker-compose.yml is checked by parsing it (no Docker engine runs here)."""

from __future__ import annotations

import yaml

from fedjet.cli import build_parser
from fedjet.config.flags import config_from_args
from tests.conftest import REPO


def test_compose_defines_nats_keys_coordinator_and_one_worker_per_cloud():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"nats", "keys", "coordinator", "worker-aws", "worker-gcp", "worker-azure"} <= set(services)
    assert "-js" in services["nats"]["command"]
    for name in ("coordinator", "worker-aws", "worker-gcp", "worker-azure"):
        deps = services[name]["depends_on"]
        assert deps["keys"]["condition"] == "service_completed_successfully"
    assert (REPO / "Dockerfile").is_file()


def test_every_fedjet_command_in_compose_parses_with_the_real_cli():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    parser = build_parser()
    parsed = {}
    for name, service in compose["services"].items():
        if name == "nats":
            continue
        parsed[name] = parser.parse_args(service["command"])
    job = config_from_args(parsed["coordinator"])
    assert parsed["coordinator"].command == "coordinator" and job.codec == "topk:0.01+int8"
    workers = {p.cloud for n, p in parsed.items() if n.startswith("worker-")}
    assert workers == set(job.clouds)
    assert all(p.job == job.job for n, p in parsed.items() if n.startswith("worker-"))
    assert parsed["keys"].clouds == job.clouds
