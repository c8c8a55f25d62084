"""Watching a run: Prometheus metrics, ``fedjet status``, and the live view of ``fedjet up``.

Nothing here changes a job: metrics are counters kept by the process that owns them, status
reads stream info and the KV bucket without consumers that ack, the live view only renders.
"""

from fedjet.metrics import (
    CoordinatorMetrics,
    FedjetMetrics,
    MetricsServer,
    ObserverMetrics,
    WorkerMetrics,
    serve_metrics,
)

__all__ = [
    "CoordinatorMetrics",
    "FedjetMetrics",
    "MetricsServer",
    "ObserverMetrics",
    "WorkerMetrics",
    "serve_metrics",
]
