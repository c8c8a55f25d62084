"""``fedjet bench secagg``: what ``--secure-agg`` costs, measured in one sitting.

Two parts. First, real ``fedjet up`` runs of one workload: plain dense updates (what the
masked vector carries, in the clear), plain top-k (fedjet's compressed path), and
``--secure-agg`` at each requested density (random-k agreed per round, error feedback);
each row reports final eval loss, bytes up per round and wall time per round, with ratios to
the plain dense run of the same sitting. Second, the protocol alone
(:func:`fedjet.secagg.bench.overhead`) for more members than one machine can run as
processes, to show how the overhead grows with n (SecAgg is O(n) per member in keys and
shares; the masked vector itself is the size of the update). Writes ``secagg.json`` and
``secagg.md``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedjet.config.flags import job_config
from fedjet.errors import ConfigError
from fedjet.runner.up import UpConfig, run_up
from fedjet.secagg.bench import overhead


@dataclass(frozen=True, kw_only=True)
class SecAggBenchConfig:
    out: Path
    densities: tuple[float, ...] = (1.0, 0.1)
    topk: str = "topk:0.01+int8"
    rounds: int = 3
    local_steps: int = 10
    seq_len: int = 64
    batch_size: int = 8
    model: str = "tiny"
    seed: int = 0
    data: str | None = None
    eval_tokens: int = 8192
    members: tuple[int, ...] = (3, 10, 30)
    params: int = 1_000_000

    def __post_init__(self) -> None:
        if self.rounds < 1 or not all(0 < d <= 1 for d in self.densities):
            raise ConfigError("bench secagg needs --rounds >= 1 and densities in (0, 1]")

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        rows: list[tuple[str, dict[str, Any]]] = [
            ("plain dense", {"codec": "dense"}),
            (f"plain {self.topk}", {"codec": self.topk}),
        ]
        # dense downlink everywhere, so masking is the only difference from the plain dense run
        secure = [(f"secure-agg density {d:g}", {"codec": "dense", "secure_agg": f"density={d:g},timeout=60"})
                  for d in self.densities]  # fmt: skip
        rows += secure
        return rows


def run(config: SecAggBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    started, runs = time.perf_counter(), []
    for index, (label, overrides) in enumerate(config.rows()):
        log(f"== {label}")
        job = job_config(
            overrides={
                "job": f"secagg-bench-{index}-{int(time.time())}",
                "model": config.model,
                "seed": config.seed,
                "train": {
                    "local_steps": config.local_steps,
                    "seq_len": config.seq_len,
                    "batch_size": config.batch_size,
                },
                "stop": {"rounds": config.rounds},
                **overrides,
            }
        )
        report = run_up(UpConfig(job=job, data=config.data, eval_tokens=config.eval_tokens, quiet=True)).to_dict()
        runs.append({"label": label, "report": report})
    protocol = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    protocol["machine"] = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    scaling = [overhead(n, config.params, dropped=0) for n in config.members]
    scaling += [overhead(n, config.params, dropped=max(1, n // 10)) for n in config.members]
    result = {
        "protocol": protocol,
        "elapsed_s": time.perf_counter() - started,
        "rows": rows_of(runs),
        "protocol_only": scaling,
    }
    (config.out / "secagg.json").write_text(json.dumps({**result, "runs": runs}, indent=2) + "\n")
    (config.out / "secagg.md").write_text(describe(result) + "\n")
    return result


def rows_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        s = r["report"]["summary"]
        versions = max(int(s["versions"]), 1)
        rows.append(
            {
                "label": r["label"],
                "final_eval_loss": s["final_eval_loss"],
                "bytes_up_per_round": int(s["bytes_up"]) / versions,
                "bytes_down_per_round": int(s["bytes_down"]) / versions,
                "wall_s_per_round": float(s["wall_s"]) / versions,
            }
        )
    reference = rows[0]
    for row in rows:
        row["bytes_vs_plain_dense"] = row["bytes_up_per_round"] / reference["bytes_up_per_round"]
        row["time_vs_plain_dense"] = row["wall_s_per_round"] / reference["wall_s_per_round"]
        row["loss_vs_plain_dense_pct"] = 100.0 * (row["final_eval_loss"] / reference["final_eval_loss"] - 1.0)
    return rows


def describe(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"3 clouds, model `{p['model']}`, seed {p['seed']}, fedavg, {p['rounds']} rounds of {p['local_steps']} local "
        f"steps ({p['batch_size']}x{p['seq_len']} tokens). Bytes up: what the workers sent (all protocol steps "
        f"for secure rows). Machine: {p['machine']}.",
        "",
        "| run | final eval loss | vs plain dense | bytes up / round | × plain dense | bytes down / round "
        "| wall / round (s) | × plain dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['final_eval_loss']:.4f} | {r['loss_vs_plain_dense_pct']:+.2f} % | "
            f"{r['bytes_up_per_round'] / 1e6:.3f} MB | {r['bytes_vs_plain_dense']:.3f} | "
            f"{r['bytes_down_per_round'] / 1e6:.3f} MB | {r['wall_s_per_round']:.1f} | {r['time_vs_plain_dense']:.2f} |"
        )
    lines += [
        "",
        f"Protocol alone, {p['params']:,} coordinates per member, threshold a majority:",
        "",
        "| members | dropped | up bytes / member | × plain | down bytes / member | member s | server s |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in result["protocol_only"]:
        lines.append(
            f"| {o['n_members']} | {o['dropped']} | {o['secagg_up_bytes_per_member'] / 1e6:.3f} MB | "
            f"{o['byte_overhead']:.3f} | {o['secagg_down_bytes_per_member'] / 1e3:.1f} kB | "
            f"{o['secagg_member_s']:.2f} | {o['secagg_server_s']:.2f} |"
        )
    return "\n".join(lines)
