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
    rank_kills: int = 0  # SIGKILL one extra rank of a cloud's worker (with ``--nproc-per-node`` >= 2)
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
    worker_flags: tuple[str, ...] = ()  # more flags for every worker, e.g. ("--nproc-per-node", "2")
    max_down_s: float = 2.0  # longest nats-server outage and worker absence
    timeout_s: float = 1800.0
    replay_cli: bool = True  # verify with the ``fedjet replay --verify`` command (False: in this process)

    def __post_init__(self) -> None:
        if min(self.coordinator_kills, self.nats_restarts, self.worker_kills, self.rank_kills) < 0:
            raise ConfigError("kill and restart counts must be >= 0")
        if self.rank_kills and not _ranks_per_worker(self.worker_flags) > 1:
            raise ConfigError("--rank-kills needs workers of several ranks: --worker-flags '--nproc-per-node 2'")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        if len(self.clouds) < 1 or not self.timeout_s > 0 or self.max_down_s < 0:
            raise ConfigError("chaos needs a cloud, --timeout > 0 and --max-down >= 0")
        if self.out is not None and Path(self.out).exists() and any(Path(self.out).iterdir()):
            raise ConfigError(f"--out {self.out}: exists and is not empty")

    @property
    def events(self) -> int:
        return self.coordinator_kills + self.nats_restarts + self.worker_kills + self.rank_kills

    @property
    def target_rounds(self) -> int:
        return self.rounds if self.rounds is not None else 2 * max(self.counts.values()) + 6

    @property
    def counts(self) -> dict[str, int]:
        return {
            "coordinator": self.coordinator_kills, "nats": self.nats_restarts, "worker": self.worker_kills,
            "rank": self.rank_kills,
        }  # fmt: skip

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
        rank_kills=args.rank_kills, worker_flags=tuple(shlex.split(args.worker_flags)),
    )  # fmt: skip


def _ranks_per_worker(flags: tuple[str, ...]) -> int:
    """The ``--nproc-per-node`` among worker flags (1 when not given or not a number)."""
    for i, flag in enumerate(flags):
        value = flags[i + 1] if flag == "--nproc-per-node" and i + 1 < len(flags) else None
        if flag.startswith("--nproc-per-node="):
            value = flag.split("=", 1)[1]
        if value is not None:
            return int(value) if value.isdigit() else 1
    return 1
