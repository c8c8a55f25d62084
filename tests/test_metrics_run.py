"""Prometheus metrics scraped from a real ``fedjet up`` while it runs."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FedjetProcess

pytestmark = pytest.mark.e2e


def free_ports(count: int) -> int:
    for base in range(21000, 60000, 97):
        try:
            socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(count)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise RuntimeError("no free ports")


def scrape(port: int) -> dict[str, float]:
    """Sample name + labels -> value, or {} while nothing listens yet."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except (urllib.error.URLError, ConnectionError):
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_coordinator_and_worker_metrics_are_scraped_during_a_run(data_dir, tmp_path):
    port = free_ports(5)
    proc = FedjetProcess(
        "up", "--data", str(data_dir), "--rounds", "4", "--local-steps", "4", "--seq-len", "64",
        "--eval-tokens", "2048", "--metrics-port", str(port), "--quiet",
    )  # fmt: skip
    coordinator, worker = {}, {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            coordinator, worker = scrape(port) or coordinator, scrape(port + 1) or worker
            if coordinator.get("fedjet_global_version{}", 0) >= 2 and worker.get("fedjet_global_version{}", 0) >= 1:
                break
            time.sleep(0.3)
    finally:
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    applied = sum(v for k, v in coordinator.items() if k.startswith("fedjet_updates_applied_total"))
    assert coordinator["fedjet_global_version{}"] >= 2 and applied >= 6
    assert any("staleness" in k and "_count" in k and v >= 6 for k, v in coordinator.items()), coordinator
    sent = [v for k, v in worker.items() if k.startswith("fedjet_bytes_total") and "direction=out" in k]
    assert sent and sent[0] > 0
