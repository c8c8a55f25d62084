"""``fedjet bench frontier``: final eval loss against whole-run bytes, one codec per row.

Every row is a real ``fedjet up`` run of the same workload (model, seed, data, clouds, local
steps, strategy) for the same number of applied updates; only ``--codec`` changes. Bytes are
what the workers counted: every update they sent and every head and weight byte they read
(version 0 included when a worker had to download it). Dense float32 is always run, first, as
the reference that the ratios are taken against. Writes ``results.json`` (each run's full
report), ``frontier.md`` (the table) and ``frontier.png`` (the plot). ``--schedules wait,overlap``
runs every codec under each local schedule, and ``--link 20mbit/80ms`` puts every cloud behind
such a link, so the idle column shows what overlapping training with transfers buys.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedjet.broker.proxy import LinkShape
from fedjet.config.codec import CodecSpec
from fedjet.config.flags import job_config
from fedjet.config.job import SCHEDULES, JobConfig, StrategyConfig
from fedjet.coordinator.strategies import strategy_for
from fedjet.errors import ConfigError
from fedjet.runner.up import UpConfig, run_up

REFERENCE = "dense"


@dataclass(frozen=True, kw_only=True)
class FrontierConfig:
    """One workload, several codecs; ``loss_pct`` / ``reduction`` mark the rows that are within
    ``loss_pct`` % of dense's final eval loss with at least ``reduction`` x fewer bytes."""

    out: Path
    codecs: tuple[str, ...]
    rounds: int = 5
    local_steps: int = 20
    seq_len: int = 128
    batch_size: int = 8
    model: str = "tiny"
    seed: int = 0
    data: str | None = None
    eval_tokens: int = 16384
    strategy: str = "fedavg"
    server_opt: str = "sgd"
    loss_pct: float = 2.0
    reduction: float = 10.0
    schedules: tuple[str, ...] = ("wait",)
    link: str = ""  # every cloud behind this link (RATE/DELAY), or none

    def __post_init__(self) -> None:
        for codec in self.codecs:
            CodecSpec.parse(codec)  # a typo fails before the first run
        if self.rounds < 1 or not self.codecs:
            raise ConfigError("bench frontier needs --rounds >= 1 and at least one codec")
        StrategyConfig(name=self.strategy)
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        if unknown or not self.schedules:
            raise ConfigError(f"--schedules takes {', '.join(SCHEDULES)}, got {','.join(self.schedules)!r}")
        if self.link:
            LinkShape.parse(self.link)
        for codec, schedule in self.rows:
            job_for(self, codec, schedule, 0)  # --schedule overlap with an async rule fails now, not later

    @property
    def rows(self) -> tuple[tuple[str, str], ...]:
        """(codec, schedule): dense under the first schedule first (the reference), then each
        codec once per schedule, in the order given."""
        texts = [CodecSpec.parse(c).text for c in self.codecs]
        codecs = dict.fromkeys([REFERENCE, *texts])
        return tuple(dict.fromkeys([(REFERENCE, self.schedules[0]), *((c, s) for c in codecs for s in self.schedules)]))


def job_for(config: FrontierConfig, codec: str, schedule: str, index: int) -> JobConfig:
    """The same job for every row but its codec and schedule; asynchronous rules stop at the
    same updates."""
    updates = config.rounds * 3
    synchronous = strategy_for(StrategyConfig(name=config.strategy)).synchronous
    slug = re.sub(r"[^A-Za-z0-9]+", "-", codec).strip("-")[:36]
    return job_config(
        overrides={
            "job": f"frontier-{index}-{slug}-{int(time.time())}",
            "model": config.model,
            "seed": config.seed,
            "codec": codec,
            "strategy": {"name": config.strategy, "server": {"name": config.server_opt}},
            "train": {
                "local_steps": config.local_steps,
                "seq_len": config.seq_len,
                "batch_size": config.batch_size,
                "schedule": schedule,
            },
            "stop": {"rounds": config.rounds if synchronous else None, "max_updates": updates},
        }
    )


def run(config: FrontierConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every row, write the table, the plot and the JSON; returns the results."""
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = []
    for index, (codec, schedule) in enumerate(config.rows):
        log(f"== {codec} ({schedule})")
        job = job_for(config, codec, schedule, index)
        links = dict.fromkeys(job.clouds, config.link) if config.link else {}
        up = UpConfig(job=job, data=config.data, eval_tokens=config.eval_tokens, quiet=True, links=links)
        runs.append({"codec": codec, "schedule": schedule, "report": run_up(up).to_dict()})
    protocol = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    protocol["machine"] = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    result = {"protocol": protocol, "elapsed_s": time.perf_counter() - started, "rows": rows_of(runs, config)}
    (config.out / "results.json").write_text(json.dumps({**result, "runs": runs}, indent=2) + "\n")
    (config.out / "frontier.md").write_text(describe(result) + "\n")
    result["plot"] = str(plot(result, config.out / "frontier.png"))
    return result


def rows_of(runs: list[dict[str, Any]], config: FrontierConfig) -> list[dict[str, Any]]:
    """One summary row per run, with its ratios to the dense reference."""
    rows = [_row(r["codec"], r["report"]) | {"schedule": r.get("schedule", "wait")} for r in runs]
    reference = rows[0]  # dense, under the first schedule
    for row in rows:
        row["loss_vs_dense_pct"] = 100.0 * (row["final_eval_loss"] / reference["final_eval_loss"] - 1.0)
        row["reduction"] = reference["bytes"] / row["bytes"] if row["bytes"] else float("inf")
        row["meets"] = row["loss_vs_dense_pct"] <= config.loss_pct and row["reduction"] >= config.reduction
    return rows


def _row(codec: str, report: dict[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    clouds = report.get("clouds") or {}
    versions = int(s["versions"])
    idle = [float(c.get("idle_frac", 0.0)) for c in clouds.values()]
    return {
        "codec": codec,
        "initial_eval_loss": s["initial_eval_loss"],
        "final_eval_loss": s["final_eval_loss"],
        "bytes_up": int(s["bytes_up"]),
        "bytes_down": int(s["bytes_down"]),
        "bytes": int(s["bytes_up"]) + int(s["bytes_down"]),
        # Workers read versions 1 .. versions-1 (version 0 they build, the final one they do not
        # train on): what a version cost all workers to read, against what made it.
        "down_per_version_vs_up": (s["bytes_down"] / max(versions - 1, 1)) / (s["bytes_up"] / max(versions, 1))
        if s["bytes_up"]
        else 0.0,
        "wall_s": s["wall_s"],
        "idle_frac": sum(idle) / len(idle) if idle else 0.0,
        "curve": [(r["version"], r["eval_loss"]) for r in report["rounds"] if r["eval_loss"] is not None],
    }


def describe(result: dict[str, Any]) -> str:
    """The markdown table (and the workload it measured)."""
    p = result["protocol"]
    lines = [
        f"3 clouds, model `{p['model']}`, seed {p['seed']}, strategy {p['strategy']} (server {p['server_opt']}), "
        f"{p['rounds']} rounds, {p['local_steps']} local steps of {p['batch_size']}x{p['seq_len']} tokens"
        f"{', every cloud behind a ' + p['link'] + ' link' if p.get('link') else ''}. "
        f"Bytes: up + down as the workers counted them. ✓: within {p['loss_pct']:g} % of dense with "
        f">= {p['reduction']:g}x fewer bytes. Machine: {p['machine']}.",
        "",
        "| codec | schedule | final eval loss | vs dense | bytes up | bytes down | whole run | × fewer "
        "| down/up per version | wall (s) | idle | ✓ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| `{r['codec']}` | {r.get('schedule', 'wait')} | {r['final_eval_loss']:.4f} | "
            f"{r['loss_vs_dense_pct']:+.2f} % | "
            f"{_mb(r['bytes_up'])} | {_mb(r['bytes_down'])} | {_mb(r['bytes'])} | {r['reduction']:.1f}× | "
            f"{r['down_per_version_vs_up']:.2f} | {r['wall_s']:.1f} | {100 * r['idle_frac']:.0f} % | "
            f"{'✓' if r['meets'] else ''} |"
        )
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Final eval loss against whole-run MB (log scale), and each row's loss per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, rows = result["protocol"], result["rows"]
    reference = rows[0]
    fig, (front, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in rows:
        marker = "s" if row is reference else ("*" if row["meets"] else "o")
        name = row["codec"] if row.get("schedule", "wait") == "wait" else f"{row['codec']} ({row['schedule']})"
        front.scatter(row["bytes"] / 1e6, row["final_eval_loss"], marker=marker, s=70)
        front.annotate(name, (row["bytes"] / 1e6, row["final_eval_loss"]), fontsize=7,
                       xytext=(4, 3), textcoords="offset points")  # fmt: skip
        versions, losses = zip(*row["curve"], strict=True) if row["curve"] else ((), ())
        curves.plot(versions, losses, marker="o", markersize=3, label=name)
    target = reference["final_eval_loss"] * (1 + p["loss_pct"] / 100)
    front.axhline(target, linestyle="--", color="grey", linewidth=1, label=f"dense +{p['loss_pct']:g} %")
    front.axvline(reference["bytes"] / 1e6 / p["reduction"], linestyle=":", color="grey", linewidth=1,
                  label=f"{p['reduction']:g}x fewer bytes than dense")  # fmt: skip
    front.set_xscale("log")
    front.set_xlabel("whole-run MB (up + down, as the workers counted them)")
    front.set_ylabel("final eval loss")
    front.legend(fontsize=8)
    curves.set_xlabel("global version")
    curves.set_ylabel("eval loss")
    curves.legend(fontsize=7)
    for ax in (front, curves):
        ax.grid(alpha=0.3)
    fig.suptitle(f"fedjet bench frontier: {p['rounds']} rounds, {p['strategy']}, model {p['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
