"""``fedjet bench frontier``: final eval loss against whole-run socket bytes, one codec per row.

Every cell is a real ``fedjet up`` run of the same workload (model, data, clouds, local steps,
strategy) for the same number of applied updates, repeated for each seed (three at least);
only ``--codec`` (and, for the references, the outer optimizer) changes. A row shows the mean
over the seeds and the spread (their standard deviation). Bytes are bytes at the socket: every
byte each process of the job (workers, coordinator, observer) read from or wrote to its NATS
connection; the update and version payloads are shown beside them. The reference is dense
float32 under the better of two outer optimizers, measured in the same run: plain FedAvg
(server SGD, lr 1) and DiLoCo's Nesterov (lr 0.7, momentum 0.9). A codec *beats* the reference
only where its mean loss is lower by more than the larger spread; it *meets* the target where
its mean is within ``loss_pct`` % at ``reduction`` x fewer socket bytes. Writes
``results.json`` (each run's full report), ``frontier.md`` and ``frontier.png``.
``--schedules wait,overlap`` runs every codec under each local schedule, and ``--link
20mbit/80ms`` puts every cloud behind such a link. ``--fragments 1,4`` runs every codec row once
per F at the same whole-run update bytes: F rounds of ``local_steps / F`` steps, each sending one
fragment, for every round of the whole model (evaluated once per F versions), with the peak
upload rate beside the bytes.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
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
# The outer optimizers the dense reference is measured under: (label, server optimizer, lr, momentum).
REFERENCES = (("fedavg", "sgd", 1.0, 0.0), ("nesterov", "nesterov", 0.7, 0.9))
MIN_SEEDS = 3


@dataclass(frozen=True)
class Cell:
    """One row of the table: a codec under a schedule and an outer optimizer."""

    codec: str
    schedule: str
    server: str  # "fedavg", "nesterov" (the references) or the configured optimizer
    server_lr: float | None = None
    server_momentum: float = 0.9
    fragments: int = 1

    @property
    def name(self) -> str:
        extra = "" if self.schedule == "wait" else f", {self.schedule}"
        extra += "" if self.fragments == 1 else f", F={self.fragments}"
        return f"{self.codec} ({self.server}{extra})"


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
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str | None = None
    eval_tokens: int = 16384
    strategy: str = "fedavg"
    server_opt: str = "sgd"
    loss_pct: float = 2.0
    reduction: float = 10.0
    schedules: tuple[str, ...] = ("wait",)
    link: str = ""  # every cloud behind this link (RATE/DELAY), or none
    fragments: tuple[int, ...] = (1,)  # rows per F (streaming fragments), at the same update bytes

    def __post_init__(self) -> None:
        if len(set(self.seeds)) < MIN_SEEDS:
            raise ConfigError(f"bench frontier needs at least {MIN_SEEDS} distinct --seeds for a spread")
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
        if not self.fragments or any(f < 1 or self.local_steps % f for f in self.fragments):
            raise ConfigError(f"--fragments takes values F >= 1 that divide --local-steps {self.local_steps}")
        for cell in self.cells:
            job_for(self, cell, 0, self.seeds[0])  # --schedule overlap with an async rule fails now, not later

    @property
    def cells(self) -> tuple[Cell, ...]:
        """The dense references under the first schedule first, then each codec once per
        schedule under the configured outer optimizer, in the order given."""
        references = [Cell(REFERENCE, self.schedules[0], label, lr, momentum) for label, _, lr, momentum in REFERENCES]
        texts = dict.fromkeys(t for t in (CodecSpec.parse(c).text for c in self.codecs) if t != REFERENCE)
        rows = [Cell(c, s, self.server_opt) for c in texts for s in self.schedules]
        split = [  # every codec, the dense one too, once per F > 1
            Cell(c, self.schedules[0], self.server_opt, fragments=f)
            for c in dict.fromkeys([REFERENCE, *texts])
            for f in self.fragments
            if f > 1
        ]
        return tuple(dict.fromkeys([*references, *rows, *split]))

    @property
    def rows(self) -> tuple[tuple[str, str], ...]:
        """(codec, schedule) of every cell, in order."""
        return tuple((c.codec, c.schedule) for c in self.cells)


def eval_every(cell: Cell) -> int:
    """Evaluate once per whole model's worth of versions: F versions make one under fragments."""
    return cell.fragments


def job_for(config: FrontierConfig, cell: Cell, index: int, seed: int) -> JobConfig:
    """The same job for every cell but its codec, schedule, outer optimizer and fragments;
    asynchronous rules stop at the same updates. F fragments: F times the rounds, each of which
    trains ``local_steps / F`` steps and sends one fragment (the worker's streaming schedule), so
    every cloud trains the same steps and sends the same bytes."""
    rounds, local_steps = config.rounds * cell.fragments, config.local_steps
    updates = rounds * 3
    synchronous = strategy_for(StrategyConfig(name=config.strategy)).synchronous
    optimizer = dict((label, name) for label, name, _, _ in REFERENCES).get(cell.server, cell.server)
    server: dict[str, Any] = {"name": optimizer, "momentum": cell.server_momentum}
    if cell.server_lr is not None:
        server["lr"] = cell.server_lr
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{cell.codec}-{cell.server}").strip("-")[:36]
    return job_config(
        overrides={
            "job": f"frontier-{index}-{seed}-{slug}-{int(time.time())}",
            "model": config.model,
            "seed": seed,
            "codec": cell.codec,
            "strategy": {"name": config.strategy, "server": server},
            "train": {
                "local_steps": local_steps,
                "seq_len": config.seq_len,
                "batch_size": config.batch_size,
                "schedule": cell.schedule,
                "fragments": cell.fragments,
            },
            "stop": {"rounds": rounds if synchronous else None, "max_updates": updates},
        }
    )


def run(config: FrontierConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every cell for every seed, write the table, the plot and the JSON; returns the results."""
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = []
    for index, cell in enumerate(config.cells):
        for seed in config.seeds:
            log(f"== {cell.name}, seed {seed}")
            job = job_for(config, cell, index, seed)
            links = dict.fromkeys(job.clouds, config.link) if config.link else {}
            up = UpConfig(
                job=job, data=config.data, eval_tokens=config.eval_tokens, quiet=True, links=links,
                eval_every=eval_every(cell),
            )  # fmt: skip
            runs.append({"cell": asdict(cell), "seed": seed, "report": run_up(up).to_dict()})
    protocol = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    protocol["machine"] = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    result = {"protocol": protocol, "elapsed_s": time.perf_counter() - started, "rows": rows_of(runs, config)}
    (config.out / "results.json").write_text(json.dumps({**result, "runs": runs}, indent=2) + "\n")
    (config.out / "frontier.md").write_text(describe(result) + "\n")
    result["plot"] = str(plot(result, config.out / "frontier.png"))
    return result


def rows_of(runs: list[dict[str, Any]], config: FrontierConfig) -> list[dict[str, Any]]:
    """One row per cell (mean and spread over its seeds), with ratios to the best reference."""
    rows = []
    for cell in config.cells:
        mine = [r for r in runs if Cell(**r["cell"]) == cell]
        if {r["seed"] for r in mine} != set(config.seeds):
            raise ValueError(f"{cell.name}: runs for seeds {sorted(r['seed'] for r in mine)}, not {config.seeds}")
        rows.append(_row(cell, [_run_figures(r["report"]) for r in mine]))
    references = [r for r in rows if r["reference"]]
    best = min(references, key=lambda r: r["final_eval_loss"])
    for row in rows:
        spread = max(row["loss_spread"], best["loss_spread"])
        row["best_reference"] = row is best
        row["loss_vs_reference_pct"] = 100.0 * (row["final_eval_loss"] / best["final_eval_loss"] - 1.0)
        row["spread_pct"] = 100.0 * spread / best["final_eval_loss"]
        row["reduction"] = best["socket_bytes"] / row["socket_bytes"]
        row["beats_reference"] = best["final_eval_loss"] - row["final_eval_loss"] > spread
        row["meets"] = row["loss_vs_reference_pct"] <= config.loss_pct and row["reduction"] >= config.reduction
    return rows


def _run_figures(report: dict[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    clouds = report["clouds"]
    versions = int(s["versions"])
    return {
        "initial_eval_loss": float(s["initial_eval_loss"]),
        "final_eval_loss": float(s["final_eval_loss"]),
        "bytes_up": int(s["bytes_up"]),
        "bytes_down": int(s["bytes_down"]),
        "socket_bytes": int(s["socket_bytes"]),
        # Workers read versions 1 .. versions-1 (version 0 they build, the final one they do not
        # train on): what a version cost all workers to read, against what made it.
        "down_per_version_vs_up": (s["bytes_down"] / max(versions - 1, 1)) / (s["bytes_up"] / max(versions, 1)),
        "wall_s": float(s["wall_s"]),
        "peak_up_mb_s": float(s["peak_up_mb_s"]),
        "idle_frac": statistics.fmean(float(c["idle_frac"]) for c in clouds.values()),
        "curve": [(r["version"], r["eval_loss"]) for r in report["rounds"] if r["eval_loss"] is not None],
    }


def _row(cell: Cell, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the seeds; the loss spread is their standard deviation."""
    losses = [s["final_eval_loss"] for s in seeds]
    mean = {k: statistics.fmean(s[k] for s in seeds) for k in seeds[0] if k != "curve"}
    return {
        "codec": cell.codec,
        "schedule": cell.schedule,
        "server": cell.server,
        "name": cell.name,
        "reference": cell.codec == REFERENCE and cell.server in {label for label, *_ in REFERENCES},
        **mean,
        "final_eval_losses": losses,
        "loss_spread": statistics.stdev(losses),
        "curve": seeds[0]["curve"],
    }


def describe(result: dict[str, Any]) -> str:
    """The markdown table (and the workload it measured)."""
    p = result["protocol"]
    best = next(r for r in result["rows"] if r["best_reference"])
    lines = [
        f"3 clouds, model `{p['model']}`, seeds {', '.join(map(str, p['seeds']))}, strategy {p['strategy']} "
        f"(codec rows: server {p['server_opt']}), {p['rounds']} rounds, {p['local_steps']} local steps of "
        f"{p['batch_size']}x{p['seq_len']} tokens"
        f"{', every cloud behind a ' + p['link'] + ' link' if p.get('link') else ''}. "
        f"Means over the seeds, ± their standard deviation. Reference: `{best['name']}`, the better dense run. "
        f"Socket: every byte each process's NATS connection read and wrote; up/down: update and version payloads. "
        f"✓: within {p['loss_pct']:g} % of the reference at >= {p['reduction']:g}x fewer socket bytes; "
        f"beats: a mean loss lower than the reference's by more than the larger spread. Machine: {p['machine']}.",
        "",
        "| row | final eval loss | vs reference | socket | × fewer | up | down | peak up | wall (s) | idle | ✓ "
        "| beats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| `{r['name']}` | {r['final_eval_loss']:.4f} ± {r['loss_spread']:.4f} | "
            f"{r['loss_vs_reference_pct']:+.2f} % ± {r['spread_pct']:.2f} | {_mb(r['socket_bytes'])} | "
            f"{r['reduction']:.1f}× | {_mb(r['bytes_up'])} | {_mb(r['bytes_down'])} | {r['peak_up_mb_s']:.2f} MB/s | "
            f"{r['wall_s']:.1f} | "
            f"{100 * r['idle_frac']:.0f} % | {'✓' if r['meets'] else ''} | {'yes' if r['beats_reference'] else ''} |"
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
    reference = next(r for r in rows if r["best_reference"])
    fig, (front, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in rows:
        marker = "s" if row is reference else ("*" if row["meets"] else "o")
        name = row["name"]
        front.errorbar(row["socket_bytes"] / 1e6, row["final_eval_loss"], yerr=row["loss_spread"], marker=marker,
                       markersize=7, capsize=3)  # fmt: skip
        front.annotate(name, (row["socket_bytes"] / 1e6, row["final_eval_loss"]), fontsize=7,
                       xytext=(4, 3), textcoords="offset points")  # fmt: skip
        versions, losses = zip(*row["curve"], strict=True) if row["curve"] else ((), ())
        curves.plot(versions, losses, marker="o", markersize=3, label=name)
    target = reference["final_eval_loss"] * (1 + p["loss_pct"] / 100)
    front.axhline(target, linestyle="--", color="grey", linewidth=1, label=f"reference +{p['loss_pct']:g} %")
    front.axvline(reference["socket_bytes"] / 1e6 / p["reduction"], linestyle=":", color="grey", linewidth=1,
                  label=f"{p['reduction']:g}x fewer socket bytes than the reference")  # fmt: skip
    front.set_xscale("log")
    front.set_xlabel("whole-run MB at the socket (every process of the job)")
    front.set_ylabel("final eval loss (mean ± sd over seeds)")
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
