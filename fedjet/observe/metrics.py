"""Moved to :mod:`fedjet.metrics` (below the services that record them); kept while the last
importers move."""

from fedjet.metrics import (
    ALL_CLOUDS,
    DIRECTIONS,
    STALENESS_BUCKETS,
    CoordinatorMetrics,
    FedjetMetrics,
    MetricsServer,
    ObserverMetrics,
    WorkerMetrics,
    serve_metrics,
)

__all__ = [
    "ALL_CLOUDS",
    "DIRECTIONS",
    "STALENESS_BUCKETS",
    "CoordinatorMetrics",
    "FedjetMetrics",
    "MetricsServer",
    "ObserverMetrics",
    "WorkerMetrics",
    "serve_metrics",
]
