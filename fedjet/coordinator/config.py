"""The coordinator service's own settings: how to reach the broker, as whom, with which keys.
Everything about the job itself is in the spec."""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.broker.auth import ClientAuth
from fedjet.broker.connect import RECONNECT_WINDOW_S, NatsTarget, check_reconnect_window
from fedjet.codecs.crypto import Boxes
from fedjet.codecs.frame import Limits
from fedjet.errors import ConfigError
from fedjet.metrics import CoordinatorMetrics
from fedjet.spec import JobSpec


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """How to reach the broker and with which keys; everything about the job is in ``spec``."""

    nats_url: str
    auth: ClientAuth | None = None  # NKEY/creds and TLS of the coordinator's identity
    js_domain: str | None = None
    reconnect_window_s: float = RECONNECT_WINDOW_S  # how long a broker outage is ridden out
    replicas: int | None = None  # copies of each stream and the KV bucket; None: 3 on a cluster, else 1
    metrics: CoordinatorMetrics | None = None
    spec: JobSpec
    boxes: Boxes
    limits: Limits | None = None  # None: derived from the initial weights (Limits.for_model)
    idle_timeout_s: float = 600.0
    snapshot_every: int = 8  # full weights every N versions; lossless deltas in between
    state_dir: str | None = None  # local record of the newest version published (refuses rollbacks)

    def __post_init__(self) -> None:
        if self.snapshot_every < 1 or not self.idle_timeout_s > 0:
            raise ConfigError("snapshot_every must be >= 1 and --idle-timeout > 0")
        check_reconnect_window(self.reconnect_window_s)

    @property
    def target(self) -> NatsTarget:
        return NatsTarget(
            url=self.nats_url, auth=self.auth, domain=self.js_domain, reconnect_window_s=self.reconnect_window_s
        )
