"""What ``fedjet up`` runs, checked before anything heavy is imported or any process starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedjet.broker.proxy import LinkShape
from fedjet.config.job import JobConfig, check_shardable
from fedjet.errors import ConfigError
from fedjet.models.presets import PRESETS


@dataclass(frozen=True, kw_only=True)
class UpConfig:
    job: JobConfig
    nats_url: str | None = None
    store: str | None = None
    data: str | None = None
    report: str | None = None
    eval_tokens: int = 16384
    eval_every: int = 1
    slowdown: dict[str, float] = field(default_factory=dict)
    nproc_per_node: int = 1  # ranks per cloud's worker
    shard: bool = False  # the ranks shard the model (FSDP2)
    links: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600.0
    device: str | None = None
    precision: str | None = None
    keys: str | None = None
    quiet: bool = False
    metrics_port: int | None = None  # coordinator on it, workers and the observer on the ports after it
    data_per_cloud: dict[str, str] = field(default_factory=dict)  # the production shape on one machine
    eval_data: str | None = None
    save: str | None = None

    @property
    def model_path(self) -> str | None:
        """The local checkpoint every process here shares (None for a preset)."""
        return None if self.job.model in PRESETS else self.job.model

    def __post_init__(self) -> None:
        if self.data_per_cloud and set(self.data_per_cloud) != set(self.job.clouds):
            raise ConfigError(
                f"--data-per-cloud must name every cloud {self.job.clouds}, got {sorted(self.data_per_cloud)}"
            )
        for cloud, path in self.data_per_cloud.items():
            if not Path(path).exists():
                raise ConfigError(f"--data-per-cloud {cloud}={path}: no such file or directory")
        if self.save is not None and Path(self.save).exists() and any(Path(self.save).iterdir()):
            raise ConfigError(f"--save {self.save}: exists and is not empty")
        for cloud in (*self.slowdown, *self.links):
            if cloud not in self.job.clouds:
                raise ConfigError(f"--slowdown/--link name {cloud!r}, which is not in --clouds")
        for cloud, factor in self.slowdown.items():
            if not factor >= 1.0:
                raise ConfigError(f"--slowdown {cloud}={factor}: the factor must be >= 1")
        for shape in self.links.values():
            LinkShape.parse(shape)
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.shard:
            if self.nproc_per_node < 2:
                raise ConfigError("--shard splits the model over a cloud's ranks: give --nproc-per-node >= 2")
            check_shardable(self.job)
        if self.eval_tokens < 1 or self.eval_every < 1 or not self.timeout_s > 0:
            raise ConfigError("--eval-tokens and --eval-every must be >= 1 and --timeout > 0")
