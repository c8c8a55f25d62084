"""``fedjet bench experiment``: the paper's Table 1 protocol at CPU scale.

Three clouds, WikiText, the same model and seed for every cell; the matrix strategy ×
partitioning × codec, one cloud slowed to show heterogeneity. Every cell is a real
``fedjet up`` run bounded by the same number of applied updates, so synchronous and
asynchronous rules are compared on equal work. Writes ``results.json`` (every cell's full
report), ``results.md`` (Table 2- and Table 3-style tables) and PNG plots.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from fedjet.config.flags import job_config
from fedjet.config.job import DEFAULT_CODEC, STRATEGIES, JobConfig, StrategyConfig
from fedjet.coordinator.strategies import Strategy, strategy_for
from fedjet.report import Report
from fedjet.runner.up import UpConfig, run_up

FULL = {"strategies": STRATEGIES, "partitions": ("fixed", "dynamic", "noniid"), "codecs": ("dense", DEFAULT_CODEC)}
QUICK = {"strategies": STRATEGIES, "partitions": ("fixed",), "codecs": (DEFAULT_CODEC,)}


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    out: Path
    strategies: tuple[str, ...]
    partitions: tuple[str, ...]
    codecs: tuple[str, ...]
    rounds: int = 10
    local_steps: int = 20
    slow_cloud: str = "azure"
    slowdown: float = 2.0
    model: str = "tiny"
    seed: int = 0
    data: str | None = None
    eval_tokens: int = 16384
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-strategy JobConfig overrides (nested)

    @classmethod
    def preset(cls, quick: bool, out: Path, **overrides: Any) -> ExperimentConfig:
        base = QUICK if quick else FULL
        defaults: dict[str, Any] = {"rounds": 4, "local_steps": 10} if quick else {}
        values = {**base, **defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(out=out, **values)


def cell_name(strategy: str, partition: str, codec: str) -> str:
    return f"{strategy}/{partition}/{codec}"


def cell_options(config: ExperimentConfig, strategy: str, partition: str, codec: str) -> JobConfig:
    updates = config.rounds * 3  # the same applied updates for every rule
    slug = re.sub(r"[^A-Za-z0-9]+", "-", codec).strip("-")[:24]  # a job name is [A-Za-z0-9_-]{1,64}
    synchronous = _strategy(strategy).synchronous
    overrides: dict[str, Any] = {
        "job": f"exp-{strategy}-{partition}-{slug}-{int(time.time())}",
        "model": config.model,
        "seed": config.seed,
        "codec": codec,
        "strategy": {"name": strategy},
        "partition": {"scheme": partition},
        "train": {"local_steps": config.local_steps},
        "stop": {"rounds": config.rounds if synchronous else None, "max_updates": updates},
    }
    for key, value in config.extra.get(strategy, {}).items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    return job_config(overrides=overrides)


def _strategy(name: str) -> Strategy:
    return strategy_for(StrategyConfig(name=name))


def run_experiment(config: ExperimentConfig, log: Any = print) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    cells: dict[str, Any] = {}
    started = time.perf_counter()
    grid = list(product(config.strategies, config.partitions, config.codecs))
    jobs = [cell_options(config, *cell) for cell in grid]  # every cell's job is valid before the first runs
    for (strategy, partition, codec), job in zip(grid, jobs, strict=True):
        name = cell_name(strategy, partition, codec)
        log(f"== {name}")
        up = UpConfig(
            job=job,
            data=config.data,
            eval_tokens=config.eval_tokens,
            eval_every=3 if strategy == "async" else 1,  # evaluate at the same update counts
            slowdown={config.slow_cloud: config.slowdown} if config.slowdown > 1 else {},
            quiet=True,
        )
        report: Report = run_up(up)
        cells[name] = {"strategy": strategy, "partition": partition, "codec": codec, "report": report.to_dict()}
    results = {
        "protocol": protocol(config),
        "elapsed_s": time.perf_counter() - started,
        "cells": cells,
    }
    (config.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (config.out / "results.md").write_text(markdown(results))
    plots(results, config.out)
    return results


def protocol(config: ExperimentConfig) -> dict[str, Any]:
    return {
        "clouds": ["aws", "gcp", "azure"],
        "model": config.model,
        "seed": config.seed,
        "rounds": config.rounds,
        "updates_per_cell": config.rounds * 3,
        "local_steps": config.local_steps,
        "slowdown": {config.slow_cloud: config.slowdown},
        "strategies": list(config.strategies),
        "partitions": list(config.partitions),
        "codecs": list(config.codecs),
        "overrides": config.extra,
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
    }


def markdown(results: dict[str, Any]) -> str:
    p = results["protocol"]
    lines = [
        "# fedjet experiment",
        "",
        f"3 clouds ({', '.join(p['clouds'])}), model `{p['model']}`, seed {p['seed']}, "
        f"{p['updates_per_cell']} applied updates per cell ({p['rounds']} synchronous rounds), "
        f"{p['local_steps']} local steps per update, slowdown {p['slowdown']}. Machine: {p['machine']}.",
        *_table(
            results,
            "Table 2: communication and training time",
            ("communication (MB, up + down)", "up (MB)", "wall time (s)"),
            lambda s: (
                f"{(s['bytes_up'] + s['bytes_down']) / 1e6:.2f}",
                f"{s['bytes_up'] / 1e6:.3f}",
                f"{s['wall_s']:.1f}",
            ),
        ),
        *_table(
            results,
            "Table 3: accuracy and loss",
            ("next-token accuracy (%)", "final eval loss", "perplexity"),
            lambda s: (f"{100 * s['final_eval_acc']:.1f}", f"{s['final_eval_loss']:.3f}", f"{s['final_eval_ppl']:.2f}"),
        ),
    ]
    return "\n".join(lines) + "\n"


def _table(
    results: dict[str, Any], title: str, columns: tuple[str, ...], values: Callable[[dict[str, Any]], tuple[str, ...]]
) -> list[str]:
    """One row per cell: strategy, partition, codec, then ``values(summary)``."""
    lines = ["", f"## {title}", "", "| strategy | partition | codec | " + " | ".join(columns) + " |"]
    lines.append("|---" * (3 + len(columns)) + "|")
    for cell in results["cells"].values():
        row = (cell["strategy"], cell["partition"], f"`{cell['codec']}`", *values(cell["report"]["summary"]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Eval loss vs rounds, vs bytes on the wire, vs wall time; one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in results["cells"].values():
        groups.setdefault((cell["partition"], cell["codec"]), []).append(cell)
    written = []
    for (partition, codec), cells in groups.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for cell in cells:
            rounds = [r for r in cell["report"]["rounds"] if r["eval_loss"] is not None]
            wire, total = [], 0
            for r in cell["report"]["rounds"]:
                total += r["bytes_up"] + r["bytes_down"]
                if r["eval_loss"] is not None:
                    wire.append(total / 1e6)
            losses = [r["eval_loss"] for r in rounds]
            updates = [r["applied_total"] for r in rounds]
            axes[0].plot(updates, losses, marker="o", label=cell["strategy"])
            axes[1].plot(wire, losses, marker="o", label=cell["strategy"])
            axes[2].plot([r["wall_s"] for r in rounds], losses, marker="o", label=cell["strategy"])
        for ax, xlabel in zip(axes, ("updates applied", "MB on the wire (up + down)", "wall time (s)"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval loss")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"partition {partition}, codec {codec}")
        fig.tight_layout()
        path = out / f"loss_{partition}_{re.sub(r'[^A-Za-z0-9.-]+', '_', codec)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
