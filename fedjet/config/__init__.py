"""The bottom layer: the job's configuration tree, its wire form and its two front doors."""

from fedjet.config.codec import CodecSpec
from fedjet.config.job import (
    DEFAULT_ROUNDS,
    PARTITIONS,
    STRATEGIES,
    JobConfig,
    PartitionConfig,
    RoundConfig,
    ServerOptConfig,
    Staleness,
    StopConfig,
    StrategyConfig,
    TrainConfig,
    default_server_lr,
)
from fedjet.config.wire import WireError, from_wire, to_wire

__all__ = [
    "DEFAULT_ROUNDS",
    "PARTITIONS",
    "STRATEGIES",
    "CodecSpec",
    "JobConfig",
    "PartitionConfig",
    "RoundConfig",
    "ServerOptConfig",
    "Staleness",
    "StopConfig",
    "StrategyConfig",
    "TrainConfig",
    "WireError",
    "default_server_lr",
    "from_wire",
    "to_wire",
]
