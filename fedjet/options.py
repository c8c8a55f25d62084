"""Job options shared by ``fedjet up`` and ``fedjet coordinator``: parsed once, passed on as
flags, and turned into the job spec, the strategy and the coordinator config."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedjet.coordinator.aggregate import Staleness
from fedjet.coordinator.rounds import RoundPolicy
from fedjet.coordinator.server_opt import ServerOptConfig
from fedjet.coordinator.strategies import STRATEGIES, StrategyConfig
from fedjet.errors import ConfigError
from fedjet.spec import PARTITIONS
from fedjet.worker.train import TrainSettings


def default_job() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    job: str = field(default_factory=default_job)
    clouds: tuple[str, ...] = ("aws", "gcp", "azure")
    observers: tuple[str, ...] = ("eval",)
    rounds: int | None = 5
    max_updates: int | None = None
    model: str = "tiny"
    seed: int = 0
    codec: str = "topk:0.01+int8"
    strategy: str = "fedavg"
    temperature: float = 1.0
    alpha_async: float = 0.6
    staleness: str = "polynomial"
    staleness_a: float = 0.5
    staleness_b: int = 4
    max_staleness: int = 8
    buffer_size: int = 3
    server_opt: str = "sgd"
    server_lr: float | None = None
    server_momentum: float = 0.9
    quorum: int | None = None
    round_deadline: float | None = None
    late: str = "drop"
    partition: str = "fixed"
    alpha: float = 0.5
    rebalance_every: int = 1
    local_steps: int = 20
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(
            name=self.strategy,
            temperature=self.temperature,
            alpha=self.alpha_async,
            staleness=Staleness(kind=self.staleness, a=self.staleness_a, b=self.staleness_b),
            max_staleness=self.max_staleness,
            buffer_size=self.buffer_size,
            server=ServerOptConfig(
                name=self.server_opt,
                lr=self.server_lr if self.server_lr is not None else default_server_lr(self.strategy),
                momentum=self.server_momentum,
            ),
        )

    def round_policy(self) -> RoundPolicy:
        return RoundPolicy(clouds=self.clouds, quorum=self.quorum, deadline_s=self.round_deadline, late=self.late)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(local_steps=self.local_steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_args(self) -> list[str]:
        """The flags that reproduce these options on another command line."""
        args: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            args += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
        return args


def default_server_lr(strategy: str) -> float:
    """lr 1 makes SGD reproduce formulas 1, 2 and 4 exactly; gradient steps need a real step size."""
    return 0.05 if strategy == "gradient" else 1.0


def parse_clouds(text: str) -> tuple[str, ...]:
    clouds = tuple(c.strip() for c in text.split(",") if c.strip())
    if not clouds:
        raise argparse.ArgumentTypeError("give at least one cloud, e.g. aws,gcp,azure")
    return clouds


def add_run_options(parser: argparse.ArgumentParser) -> None:
    d = RunOptions(job="x")
    g = parser.add_argument_group("job")
    g.add_argument("--job", default=None, help="job name (default: run-<timestamp>)")
    g.add_argument("--clouds", type=parse_clouds, default=d.clouds, help="comma-separated cloud names")
    g.add_argument("--observers", type=parse_clouds, default=d.observers, help="read-only members (the evaluator)")
    g.add_argument("--rounds", type=int, default=None, help="global versions to make (default 5)")
    g.add_argument("--max-updates", type=int, default=None, help="end once N updates are applied")
    g.add_argument("--model", default=d.model, help="preset (tiny, small, medium) or local checkpoint dir")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--codec", default=d.codec, help="topk:0.01+int8 (default), dense, fp16, int8, topk:D[:global]+int4 ..."
    )
    add_aggregation_options(parser, d.strategy)
    g = parser.add_argument_group("rounds")
    g.add_argument("--quorum", type=int, default=None, help="sync: clouds needed once the deadline passes")
    g.add_argument("--round-deadline", type=float, default=None, help="sync: seconds before a quorum closes")
    g.add_argument("--late", choices=("drop", "carry"), default=d.late, help="sync: late updates")
    g = parser.add_argument_group("data and local training")
    g.add_argument("--partition", choices=PARTITIONS, default=d.partition)
    g.add_argument("--alpha", type=float, default=d.alpha, help="noniid: Dirichlet concentration")
    g.add_argument(
        "--rebalance-every", type=int, default=d.rebalance_every, help="dynamic: versions between re-assignments"
    )
    g.add_argument("--local-steps", type=int, default=d.local_steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--lr", type=float, default=d.lr, help="local AdamW learning rate")


def add_aggregation_options(parser: argparse.ArgumentParser, strategy_default: str | None) -> None:
    """The rule and its parameters (shared by ``up``, ``coordinator`` and ``replay --strategy``)."""
    d = RunOptions(job="x")
    g = parser.add_argument_group("aggregation")
    g.add_argument("--strategy", choices=STRATEGIES, default=strategy_default)
    g.add_argument("--temperature", type=float, default=d.temperature, help="dynamic: softmax(-L/T)")
    g.add_argument("--alpha-async", type=float, default=d.alpha_async, help="async: mixing weight alpha")
    g.add_argument("--staleness", choices=("constant", "polynomial", "hinge"), default=d.staleness)
    g.add_argument("--staleness-a", type=float, default=d.staleness_a)
    g.add_argument("--staleness-b", type=int, default=d.staleness_b)
    g.add_argument("--max-staleness", type=int, default=d.max_staleness)
    g.add_argument("--buffer-size", type=int, default=d.buffer_size, help="fedbuff: K updates per version")
    g.add_argument("--server-opt", choices=("sgd", "nesterov", "adam"), default=d.server_opt)
    g.add_argument("--server-lr", type=float, default=None, help="default 1.0 (0.05 for gradient)")
    g.add_argument("--server-momentum", type=float, default=d.server_momentum)


def strategy_from(ns: argparse.Namespace) -> StrategyConfig:
    """A StrategyConfig from parsed aggregation flags (``--strategy`` must be set)."""
    values = {f.name: getattr(ns, f.name) for f in fields(RunOptions) if hasattr(ns, f.name)}
    return RunOptions(job="x", **{k: v for k, v in values.items() if k != "job"}).strategy_config()


def run_options_from(ns: argparse.Namespace) -> RunOptions:
    values = {f.name: getattr(ns, f.name) for f in fields(RunOptions) if hasattr(ns, f.name)}
    if values.get("job") is None:
        values.pop("job", None)
    if values.get("rounds") is None and values.get("max_updates") is None:
        values["rounds"] = 5
    options = RunOptions(**values)
    options.strategy_config()  # validate early, with the user's flags in view
    if options.rebalance_every < 1:
        raise ConfigError("--rebalance-every must be >= 1")
    options.round_policy()
    options.train_settings()
    return options
