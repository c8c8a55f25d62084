"""Metrics are served over HTTP from a per-process registry and read back as Prometheus text."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedjet.errors import ConfigError
from fedjet.metrics import (
    CoordinatorMetrics,
    FedjetMetrics,
    ObserverMetrics,
    WorkerMetrics,
    serve_metrics,
)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_coordinator_worker_and_observer_metrics_are_scraped_with_their_values():
    shared = FedjetMetrics()
    coordinator = CoordinatorMetrics(shared)
    worker = WorkerMetrics("aws", shared)
    observer = ObserverMetrics(shared)
    server = serve_metrics(shared.registry, 0)
    try:
        coordinator.applied("aws", 0)
        coordinator.applied("aws", 3)
        coordinator.applied("gcp", 1)
        coordinator.rejected("ReplayError")
        coordinator.bytes("in", "aws", 1000)
        coordinator.bytes("out", "all", 250)
        coordinator.version(7)
        coordinator.reassembly_bytes(4096)
        worker.sent(1000)
        worker.received(500)
        worker.throughput(1234.5, 0.25)
        worker.dp_epsilon(1.5)
        observer.eval_loss(2.75)
        got = scrape(server.url)
    finally:
        server.close()
    assert got[("fedjet_updates_applied_total", (("cloud", "aws"),))] == 2
    assert got[("fedjet_updates_applied_total", (("cloud", "gcp"),))] == 1
    assert got[("fedjet_updates_rejected_total", (("reason", "ReplayError"),))] == 1
    assert got[("fedjet_bytes_total", (("cloud", "aws"), ("direction", "in")))] == 1500  # coordinator + worker
    assert got[("fedjet_bytes_total", (("cloud", "aws"), ("direction", "out")))] == 1000
    assert got[("fedjet_bytes_total", (("cloud", "all"), ("direction", "out")))] == 250
    assert got[("fedjet_update_staleness_count", ())] == 3
    assert got[("fedjet_update_staleness_sum", ())] == 4
    assert got[("fedjet_update_staleness_bucket", (("le", "0.0"),))] == 1
    assert got[("fedjet_update_staleness_bucket", (("le", "2.0"),))] == 2
    assert got[("fedjet_global_version", ())] == 7
    assert got[("fedjet_reassembly_bytes", ())] == 4096
    assert got[("fedjet_tokens_per_second", (("cloud", "aws"),))] == 1234.5
    assert got[("fedjet_idle_fraction", (("cloud", "aws"),))] == 0.25
    assert got[("fedjet_dp_epsilon", (("cloud", "aws"),))] == 1.5
    assert got[("fedjet_eval_loss", ())] == 2.75


def test_each_role_gets_its_own_registry_so_several_live_in_one_process():
    first, second = CoordinatorMetrics(), CoordinatorMetrics()
    first.applied("aws", 0)
    assert first.registry is not second.registry
    assert second.registry.get_sample_value("fedjet_updates_applied_total", {"cloud": "aws"}) is None
    assert first.registry.get_sample_value("fedjet_updates_applied_total", {"cloud": "aws"}) == 1


def test_close_frees_the_port_and_is_safe_twice():
    server = serve_metrics(FedjetMetrics().registry, 0)
    port = server.port
    server.close()
    server.close()
    again = serve_metrics(FedjetMetrics().registry, port)  # the port is free again
    again.close()


def test_mistakes_are_config_errors():
    metrics = CoordinatorMetrics()
    with pytest.raises(ConfigError):
        metrics.bytes("sideways", "aws", 1)
    with pytest.raises(ConfigError):
        metrics.bytes("in", "aws", -1)
    with pytest.raises(ConfigError):
        serve_metrics(metrics.registry, 70000)
    server = serve_metrics(metrics.registry, 0)
    try:
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            serve_metrics(metrics.registry, server.port)  # taken
    finally:
        server.close()


def test_island_links_from_the_hubs_source_info_reach_prometheus():
    """The hub's stream info names each source's last contact (ns) and lag: a cloud heard from
    within 5 s is up, one silent for longer (or with a source error) is an island."""
    from types import SimpleNamespace

    from fedjet.broker.subjects import JobSubjects
    from fedjet.channel.island import link_states
    from fedjet.metrics import CoordinatorMetrics

    subjects = JobSubjects("j")
    sources = [
        SimpleNamespace(name=subjects.island_stream("aws"), active=42_000_000_000, lag=7, error=None),
        SimpleNamespace(name=subjects.island_stream("gcp"), active=800_000_000, lag=0, error=None),
        SimpleNamespace(name=subjects.island_stream("azure"), active=1_000, lag=None, error={"description": "gone"}),
        SimpleNamespace(name="SOMETHING_ELSE", active=1, lag=0, error=None),
    ]
    states = {s.cloud: s for s in link_states(SimpleNamespace(sources=sources), subjects, ("aws", "gcp", "azure"))}
    assert (states["aws"].up, states["aws"].since_contact_s, states["aws"].lag) == (False, 42.0, 7)
    assert states["gcp"].up and not states["azure"].up and states["azure"].error == "gone"
    metrics = CoordinatorMetrics()
    for s in states.values():
        metrics.link(s.cloud, up=s.up, since_contact_s=s.since_contact_s, lag=s.lag)
    value = metrics.registry.get_sample_value
    assert value("fedjet_link_up", {"cloud": "aws"}) == 0 and value("fedjet_link_up", {"cloud": "gcp"}) == 1
    assert value("fedjet_island_seconds", {"cloud": "aws"}) == 42.0
    assert value("fedjet_island_seconds", {"cloud": "gcp"}) == 0
    assert value("fedjet_island_queued", {"cloud": "aws"}) == 7
