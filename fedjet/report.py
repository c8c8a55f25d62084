"""The run report: the single source for every number fedjet prints or plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    round: int
    version: int
    train_loss: float | None
    eval_loss: float | None
    eval_ppl: float | None
    eval_acc: float | None
    bytes_up: int
    bytes_down: int
    wall_s: float
    round_s: float
    hash: str
    contributors: list[str] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)  # cloud -> fraction of the samples
    assignment: dict[str, int] = field(default_factory=dict)  # local steps asked of each cloud next
    applied_total: int = 0
    rejected_total: int = 0


@dataclass
class Report:
    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    clouds: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    privacy: dict[str, Any] | None = None  # DP jobs: accountant, delta, noise, q, clip, steps and ε per cloud

    def to_dict(self) -> dict[str, Any]:
        out = {
            "config": self.config,
            "rounds": [asdict(r) for r in self.rounds],
            "summary": self.summary,
            "clouds": self.clouds,
            "notes": self.notes,
        }
        return out if self.privacy is None else {**out, "privacy": self.privacy}

    def write(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def summarize(rounds: list[RoundRecord], rejected: int) -> dict[str, Any]:
    """The run's headline figures apart from bytes (see :func:`run_bytes`)."""
    evaluated = [r for r in rounds if r.eval_loss is not None]
    last = evaluated[-1] if evaluated else None
    return {
        "versions": rounds[-1].version if rounds else 0,
        "initial_eval_loss": evaluated[0].eval_loss if evaluated else None,
        "final_eval_loss": last.eval_loss if last else None,
        "final_eval_ppl": last.eval_ppl if last else None,
        "final_eval_acc": last.eval_acc if last else None,
        "wall_s": rounds[-1].wall_s if rounds else 0.0,
        "updates_applied": rounds[-1].applied_total if rounds else 0,
        "updates_rejected": rejected,
    }


def run_bytes(clouds: dict[str, dict[str, Any]], processes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """A live run's bytes, from the processes' own counters: ``bytes_up`` and ``bytes_down`` are
    the update and version payloads the workers counted, ``socket_bytes`` every byte each
    process's NATS connection read and wrote. A missing figure raises :class:`KeyError`
    rather than becoming 0."""
    per_process = {name: int(p["socket_in"]) + int(p["socket_out"]) for name, p in processes.items()}
    return {
        "bytes_up": sum(int(c["bytes_up"]) for c in clouds.values()),
        "bytes_down": sum(int(c["bytes_down"]) for c in clouds.values()),
        "socket_bytes": sum(per_process.values()),
        "socket_bytes_by_process": per_process,
        # the highest rate any cloud wrote at, over 1-second windows of its own socket counter
        "peak_up_mb_s": max(float(c["peak_up_bytes_per_s"]) for c in clouds.values()) / 1e6,
    }


def round_line(r: RoundRecord) -> str:
    def num(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    return (
        f"round {r.round:>3}  v{r.version:<4} train_loss {num(r.train_loss, '7.4f')}  "
        f"eval_loss {num(r.eval_loss, '7.4f')}  ppl {num(r.eval_ppl, '8.2f')}  "
        f"acc {num(None if r.eval_acc is None else r.eval_acc * 100, '5.1f')}%  up {_mb(r.bytes_up)}  "
        f"down {_mb(r.bytes_down)}  {r.round_s:6.1f}s"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:8.3f} MB"
