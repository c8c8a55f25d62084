"""fedjet's Prometheus metrics, defined once, on a registry that belongs to one process.

Each process (coordinator, worker, the observer of ``fedjet up``) builds one
:class:`FedjetMetrics` and serves its registry with :func:`serve_metrics`. The registry is not
prometheus-client's global one, so tests (and ``fedjet up``, which runs several roles) can keep
several side by side. The role classes are the only API the services call: small, typed, and
named after what happened (``applied``, ``rejected``), not after the metric types behind them.

Metric names (``fedjet_`` prefix; counters get ``_total`` on the wire)::

    fedjet_updates_applied_total{cloud}        updates folded into a global version
    fedjet_updates_rejected_total{reason}      rejected messages, by error class
    fedjet_bytes_total{direction, cloud}       wire bytes; direction "in" or "out" of this process
    fedjet_update_staleness                    histogram of applied updates' staleness (versions)
    fedjet_global_version                      newest global version published / seen
    fedjet_eval_loss                           held-out loss of the newest evaluated version
    fedjet_tokens_per_second{cloud}            training throughput
    fedjet_idle_fraction{cloud}                share of wall time spent waiting for a global
    fedjet_reassembly_bytes                    bytes held by partial chunked blobs
    fedjet_dp_epsilon{cloud}                   privacy spent so far (differential privacy)
    fedjet_link_up{cloud}                      1 while the hub hears from the cloud's island stream, else 0
    fedjet_island_seconds{cloud}               seconds since the hub last heard from it (0 while linked)
    fedjet_island_queued{cloud}                messages on its leaf the hub knows it has not yet sourced
    fedjet_island_updates_waiting{cloud}       a worker's updates sent while cut off, not yet seen at the hub
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedjet.errors import ConfigError

DIRECTIONS = ("in", "out")
ALL_CLOUDS = "all"  # the cloud label of traffic that is not one cloud's (a global sent to every member)
STALENESS_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)


class FedjetMetrics:
    """Every fedjet metric, registered on ``registry`` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.updates_applied = Counter(
            "fedjet_updates_applied", "Updates folded into a global version", ["cloud"], registry=r
        )
        self.updates_rejected = Counter(
            "fedjet_updates_rejected", "Rejected update messages, by error class", ["reason"], registry=r
        )
        self.bytes = Counter(
            "fedjet_bytes", "Wire bytes into / out of this process", ["direction", "cloud"], registry=r
        )
        self.staleness = Histogram(
            "fedjet_update_staleness", "Staleness of applied updates (versions)", buckets=STALENESS_BUCKETS, registry=r
        )
        self.version = Gauge("fedjet_global_version", "Newest global version published or seen", registry=r)
        self.eval_loss = Gauge("fedjet_eval_loss", "Held-out loss of the newest evaluated version", registry=r)
        self.tokens_per_s = Gauge("fedjet_tokens_per_second", "Training throughput", ["cloud"], registry=r)
        self.idle_fraction = Gauge(
            "fedjet_idle_fraction", "Share of wall time spent waiting for a global", ["cloud"], registry=r
        )
        self.reassembly_bytes = Gauge("fedjet_reassembly_bytes", "Bytes held by partial chunked blobs", registry=r)
        self.dp_epsilon = Gauge("fedjet_dp_epsilon", "Differential-privacy epsilon spent so far", ["cloud"], registry=r)
        self.link_up = Gauge(
            "fedjet_link_up", "1 while the hub hears from the cloud's island stream", ["cloud"], registry=r
        )
        self.island_seconds = Gauge(
            "fedjet_island_seconds", "Seconds since the hub last heard from the cloud's leaf", ["cloud"], registry=r
        )
        self.island_queued = Gauge(
            "fedjet_island_queued", "Messages on the cloud's leaf not yet sourced by the hub", ["cloud"], registry=r
        )
        self.island_updates_waiting = Gauge(
            "fedjet_island_updates_waiting",
            "Updates a worker sent while cut off, not yet at the hub",
            ["cloud"],
            registry=r,
        )

    def add_bytes(self, direction: str, cloud: str, n: int) -> None:
        if direction not in DIRECTIONS:
            raise ConfigError(f"bytes direction must be one of {DIRECTIONS}, got {direction!r}")
        if n < 0:
            raise ConfigError(f"a byte count cannot be negative: {n}")
        self.bytes.labels(direction=direction, cloud=cloud).inc(n)


class CoordinatorMetrics:
    """What the coordinator service reports: admissions, rejections, versions, memory."""

    def __init__(self, metrics: FedjetMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else FedjetMetrics()

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def applied(self, cloud: str, staleness: int) -> None:
        self.metrics.updates_applied.labels(cloud=cloud).inc()
        self.metrics.staleness.observe(staleness)

    def rejected(self, reason: str) -> None:
        self.metrics.updates_rejected.labels(reason=reason).inc()

    def bytes(self, direction: str, cloud: str, n: int) -> None:
        self.metrics.add_bytes(direction, cloud, n)

    def version(self, v: int) -> None:
        self.metrics.version.set(v)

    def reassembly_bytes(self, n: int) -> None:
        self.metrics.reassembly_bytes.set(n)

    def throughput(self, cloud: str, tokens_per_s: float) -> None:
        """The rate a cloud's update headers claim (the coordinator's view; workers report their own)."""
        self.metrics.tokens_per_s.labels(cloud=cloud).set(tokens_per_s)

    def link(self, cloud: str, *, up: bool, since_contact_s: float | None, lag: int | None) -> None:
        """A sourced cloud's link as the hub sees it (island mode)."""
        self.metrics.link_up.labels(cloud=cloud).set(1 if up else 0)
        self.metrics.island_seconds.labels(cloud=cloud).set(0 if up or since_contact_s is None else since_contact_s)
        if lag is not None:
            self.metrics.island_queued.labels(cloud=cloud).set(lag)


class WorkerMetrics:
    """What one cloud's worker reports about itself."""

    def __init__(self, cloud: str, metrics: FedjetMetrics | None = None) -> None:
        self.cloud = cloud
        self.metrics = metrics if metrics is not None else FedjetMetrics()

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def sent(self, n: int) -> None:
        self.metrics.add_bytes("out", self.cloud, n)

    def received(self, n: int) -> None:
        self.metrics.add_bytes("in", self.cloud, n)

    def throughput(self, tokens_per_s: float, idle_frac: float) -> None:
        self.metrics.tokens_per_s.labels(cloud=self.cloud).set(tokens_per_s)
        self.metrics.idle_fraction.labels(cloud=self.cloud).set(idle_frac)

    def version(self, v: int) -> None:
        self.metrics.version.set(v)

    def dp_epsilon(self, epsilon: float) -> None:
        self.metrics.dp_epsilon.labels(cloud=self.cloud).set(epsilon)

    def island(self, *, up: bool, waiting: int) -> None:
        """This worker's own view of its link (island mode)."""
        self.metrics.link_up.labels(cloud=self.cloud).set(1 if up else 0)
        self.metrics.island_updates_waiting.labels(cloud=self.cloud).set(waiting)


class ObserverMetrics:
    """What the evaluating observer reports."""

    def __init__(self, metrics: FedjetMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else FedjetMetrics()

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def eval_loss(self, x: float) -> None:
        self.metrics.eval_loss.set(x)

    def version(self, v: int) -> None:
        self.metrics.version.set(v)


@dataclass(frozen=True, kw_only=True)
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it and is safe to call twice."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread (port 0: any free one).

    Loopback by default: exposing metrics beyond the machine is a deliberate ``host`` choice.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be 0..65535, got {port}")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e}") from e
    return MetricsServer(host=host, port=int(server.server_port), server=server, thread=thread)
