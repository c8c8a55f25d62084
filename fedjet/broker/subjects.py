"""Subject, stream and bucket names of one job, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.config.names import check_token

__all__ = ["JobSubjects", "check_token", "js_api", "kv_put_subject"]


@dataclass(frozen=True)
class JobSubjects:
    job: str

    def __post_init__(self) -> None:
        check_token("job", self.job)

    def update(self, cloud: str) -> str:
        return f"fedjet.{self.job}.update.{check_token('cloud', cloud)}"

    @property
    def updates(self) -> str:
        return f"fedjet.{self.job}.update.*"

    @property
    def global_head(self) -> str:
        """One small signed message per global version: where its weights are."""
        return f"fedjet.{self.job}.global"

    @property
    def global_data(self) -> str:
        """The (chunked, encrypted) weights of each global version."""
        return f"fedjet.{self.job}.global.data"

    def secagg_up(self, cloud: str) -> str:
        """A member's secure-aggregation messages to the coordinator."""
        return f"fedjet.{self.job}.sa.up.{check_token('cloud', cloud)}"

    @property
    def secagg_ups(self) -> str:
        return f"fedjet.{self.job}.sa.up.*"

    def secagg_down(self, cloud: str) -> str:
        """The coordinator's secure-aggregation messages to one member."""
        return f"fedjet.{self.job}.sa.down.{check_token('cloud', cloud)}"

    @property
    def secagg_transcript(self) -> str:
        """Each completed secure round as the coordinator received it: replay recomputes the sum."""
        return f"fedjet.{self.job}.sa.transcript"

    @property
    def secagg_stream(self) -> str:
        return f"FEDJET_{self.job}_SECAGG"

    @property
    def update_stream(self) -> str:
        return f"FEDJET_{self.job}_UPDATES"

    @property
    def global_stream(self) -> str:
        return f"FEDJET_{self.job}_GLOBALS"

    # Island mode: a cloud's leaf node runs JetStream in a domain named after the cloud.
    def island_update(self, cloud: str) -> str:
        """Where an island-capable cloud's worker publishes its updates: a subject of its own
        leaf only (the leaf may not publish it to the hub), stored in :meth:`island_stream`."""
        return f"fedjet.{self.job}.island.{check_token('cloud', cloud)}"

    def island_stream(self, cloud: str) -> str:
        """The stream on ``cloud``'s leaf holding its updates; the hub's updates stream sources it."""
        return f"FEDJET_{self.job}_ISLAND_{check_token('cloud', cloud)}"

    def mirror_deliver(self, cloud: str) -> str:
        """Delivery prefix of the hub-to-leaf mirrors of ``cloud`` (its leaf receives only these)."""
        return f"fedjet.{self.job}.mirror.{check_token('cloud', cloud)}"

    def source_deliver(self, cloud: str) -> str:
        """Delivery prefix of the hub's sourcing of ``cloud``'s island stream (leaf to hub)."""
        return f"fedjet.{self.job}.source.{check_token('cloud', cloud)}"

    @staticmethod
    def island_key(cloud: str) -> str:
        """KV key by which a cloud's worker says its leaf holds an island stream to source."""
        return f"island.{check_token('cloud', cloud)}"

    @property
    def kv_bucket(self) -> str:
        """Job spec, per-cloud stats and heartbeats."""
        return f"fedjet-{self.job}"

    # Keys of the KV bucket, named once.
    spec_key = "spec"
    coordinator_stats_key = "coordinator.stats"  # the coordinator's own figures (socket bytes, lifetime)

    @staticmethod
    def stats_key(cloud: str) -> str:
        """A worker's own figures for the report."""
        return f"stats.{check_token('cloud', cloud)}"

    @property
    def coordinator_durable(self) -> str:
        return "coordinator"

    @staticmethod
    def cloud_of(subject: str) -> str:
        return subject.rsplit(".", 1)[-1]


def js_api(domain: str) -> str:
    """The JetStream API prefix of ``domain`` (``nats.jetstream(domain=...)`` uses the same)."""
    return f"$JS.{check_token('JetStream domain', domain)}.API"


def kv_put_subject(bucket: str, key: str, domain: str) -> str:
    """Where a client behind a leaf node publishes a KV value (the hub maps it onto ``$KV.``)."""
    return f"{js_api(domain)}.$KV.{bucket}.{key}"
