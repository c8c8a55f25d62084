"""``fedjet bench chaos``: what a run is asked to do, and the error when it cannot finish."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

from fedjet.errors import ConfigError, FedjetError

FINISHED = "has finished"  # what a coordinator restarted after the final version says
MAX_CRASHES = 10  # restarted each time; beyond this the run stops
EARLY_KILLS = 0.25  # share of coordinator kills that land while the restarted coordinator resumes


class ChaosFailed(FedjetError):
    """The job did not finish under chaos (timeout, or no progress)."""


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    coordinator_kills: int = 20
    nats_restarts: int = 3
    worker_kills: int = 3
    rounds: int | None = None  # None: twice the most events of one kind, plus 6: room for every event
    seed: int = 0
    data: str | None = None  # WikiText directory the workers deal from
    out: str | None = None  # keep store, keys and logs here (default: a temporary directory)
    job: str = "chaos"
    strategy: str = "fedavg"
    clouds: tuple[str, ...] = ("aws", "gcp", "azure")
    local_steps: int = 3
    batch_size: int = 4
    seq_len: int = 64
    codec: str = "topk:0.01+int8"
    job_flags: tuple[str, ...] = ()  # more job flags for the coordinator, e.g. ("--round-deadline", "5")
    max_down_s: float = 2.0  # longest nats-server outage and worker absence
    timeout_s: float = 1800.0
    replay_cli: bool = True  # verify with the ``fedjet replay --verify`` command (False: in this process)

    def __post_init__(self) -> None:
        if min(self.coordinator_kills, self.nats_restarts, self.worker_kills) < 0:
            raise ConfigError("kill and restart counts must be >= 0")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        if len(self.clouds) < 1 or not self.timeout_s > 0 or self.max_down_s < 0:
            raise ConfigError("chaos needs a cloud, --timeout > 0 and --max-down >= 0")
        if self.out is not None and Path(self.out).exists() and any(Path(self.out).iterdir()):
            raise ConfigError(f"--out {self.out}: exists and is not empty")

    @property
    def events(self) -> int:
        return self.coordinator_kills + self.nats_restarts + self.worker_kills

    @property
    def target_rounds(self) -> int:
        return self.rounds if self.rounds is not None else 2 * max(self.counts.values()) + 6

    @property
    def counts(self) -> dict[str, int]:
        return {"coordinator": self.coordinator_kills, "nats": self.nats_restarts, "worker": self.worker_kills}

    @property
    def horizon(self) -> int:
        """The versions over which each kind of event is spread (the job makes a few more)."""
        return max(1, self.target_rounds - 4)


def config_from(args: argparse.Namespace) -> ChaosConfig:
    return ChaosConfig(
        coordinator_kills=args.kills, nats_restarts=args.nats_restarts, worker_kills=args.worker_kills,
        rounds=args.rounds, seed=args.seed, data=args.data, out=args.out, job=args.job, strategy=args.strategy,
        clouds=tuple(c for c in args.clouds.split(",") if c), local_steps=args.local_steps, codec=args.codec,
        batch_size=args.batch_size, seq_len=args.seq_len, job_flags=tuple(shlex.split(args.job_flags)),
        max_down_s=args.max_down, timeout_s=args.timeout, replay_cli=not args.inline_replay,
    )  # fmt: skip
