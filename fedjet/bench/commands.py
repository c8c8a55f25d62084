"""``fedjet bench ...``: the benchmark sub-commands' flags and handlers, apart from the main
command line so each benchmark's flags live beside the benchmarks. Nothing here imports torch:
each handler imports its benchmark when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedjet.config.flags import parse_names as parse_clouds
from fedjet.errors import ConfigError

PRECISIONS = ("bf16", "fp32")  # the worker's (fedjet.worker.train), named without importing torch


def add_bench(commands: Any) -> None:
    """``fedjet bench`` and its sub-commands, in the order ``--help`` lists them."""
    bench = commands.add_parser("bench", help="benchmarks (speed targets live here, not in tests)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    for add in (
        _add_codec, _add_frontier, _add_transport, _add_fragments, _add_secagg, _add_chaos, _add_gpu, _add_experiment,
    ):  # fmt: skip
        add(bench_commands)


def _add_codec(bench_commands: Any) -> None:
    codec = bench_commands.add_parser("codec", help="wire size and speed of the update codec")
    codec.add_argument("--params", type=int, default=10_000_000)
    codec.add_argument("--density", type=float, default=0.01)
    codec.add_argument("--codec", default=None, help="default topk:DENSITY+int8")
    codec.add_argument("--repeats", type=int, default=5)
    codec.add_argument("--json", action="store_true", help="print one JSON object")
    codec.set_defaults(func=cmd_bench_codec)


def _add_frontier(bench_commands: Any) -> None:
    frontier = bench_commands.add_parser("frontier", help="final eval loss against whole-run bytes, per codec")
    frontier.add_argument("--out", required=True, help="directory for results.json, frontier.md, frontier.png")
    frontier.add_argument("--codecs", type=parse_clouds, default=("dense", "topk:0.01+int8"), help="comma-separated")
    frontier.add_argument("--rounds", type=int, default=5)
    frontier.add_argument("--local-steps", type=int, default=20)
    frontier.add_argument("--seq-len", type=int, default=128)
    frontier.add_argument("--batch-size", type=int, default=8)
    frontier.add_argument("--model", default="tiny")
    frontier.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="comma-separated, at least three")
    frontier.add_argument("--data", default=None)
    frontier.add_argument("--eval-tokens", type=int, default=16384)
    frontier.add_argument("--strategy", default="fedavg")
    frontier.add_argument("--server-opt", default="sgd")
    frontier.add_argument("--schedules", type=parse_clouds, default=("wait",), help="wait,overlap: rows per schedule")
    frontier.add_argument("--link", default="", help="every cloud behind this link, e.g. 20mbit/80ms")
    frontier.add_argument(
        "--fragments", type=_ints, default=(1,), help="1,4: rows per F of streaming fragments, at equal update bytes"
    )
    frontier.set_defaults(func=cmd_bench_frontier)


def _add_fragments(bench_commands: Any) -> None:
    fragments = bench_commands.add_parser(
        "fragments", help="coordinator memory and upload rate per --fragments F, synthetic updates of N parameters"
    )
    fragments.add_argument("--params", type=int, default=100_000_000, help="model parameters (default 1e8)")
    fragments.add_argument("--fragments", type=_ints, default=(1, 8), help="values of F (default 1,8)")
    fragments.add_argument(
        "--compute-s", type=float, default=8.0, help="training seconds per whole-model synchronisation (default 8)"
    )
    fragments.add_argument("--json", action="store_true", help="one JSON object per F, one per line")
    fragments.set_defaults(func=cmd_bench_fragments)


def _add_transport(bench_commands: Any) -> None:
    transport = bench_commands.add_parser("transport", help="one big update through JetStream vs raw publishes")
    transport.add_argument("--mb", type=int, default=400, help="update size in MB (default 400)")
    transport.add_argument("--repeats", type=int, default=2, help="runs of each leg, alternated (default 2)")
    transport.add_argument(
        "--coordinator-model", default="base", help="a real coordinator aggregates one dense update of it (none: skip)"
    )
    transport.add_argument("--json", action="store_true", help="print one JSON object")
    transport.set_defaults(func=cmd_bench_transport)


def _add_secagg(bench_commands: Any) -> None:
    sa = bench_commands.add_parser("secagg", help="what --secure-agg costs in bytes, time and loss, per round")
    sa.add_argument("--out", required=True, help="directory for secagg.json and secagg.md")
    sa.add_argument("--densities", type=_floats, default=(1.0, 0.1), help="secure rows' densities, comma-separated")
    sa.add_argument("--rounds", type=int, default=3)
    sa.add_argument("--local-steps", type=int, default=10)
    sa.add_argument("--data", default=None)
    sa.add_argument("--members", type=_ints, default=(3, 10, 30), help="protocol-only rows: members per round")
    sa.add_argument("--params", type=int, default=1_000_000, help="protocol-only rows: coordinates per member")
    sa.set_defaults(func=cmd_bench_secagg)


def _add_chaos(bench_commands: Any) -> None:
    from fedjet.bench.chaos_flags import build_parser as chaos_flags

    chaos = bench_commands.add_parser("chaos", help="a job under SIGKILLs and nats restarts, audited for loss")
    chaos_flags(chaos)
    chaos.set_defaults(func=cmd_bench_chaos)


def _add_gpu(bench_commands: Any) -> None:
    gpu = bench_commands.add_parser("gpu", help="fedjet's steady tokens/s against bare loops of the same configuration")
    gpu.add_argument("--model", default="base", help="preset or checkpoint (default: base, 85M parameters)")
    gpu.add_argument("--rounds", type=int, default=4)
    gpu.add_argument("--local-steps", type=int, default=20)
    gpu.add_argument("--batch-size", type=int, default=16)
    gpu.add_argument("--seq-len", type=int, default=256)
    gpu.add_argument("--precision", choices=PRECISIONS, default=None)
    gpu.add_argument("--codec", default="topk:0.01+int8")
    gpu.add_argument("--data", default=None)
    gpu.add_argument("--clouds", type=int, default=3, help="workers, against as many concurrent bare loops")
    gpu.add_argument("--nproc-per-node", type=int, default=1, help="N ranks in one cloud, against a bare DDP loop")
    gpu.add_argument("--shard", action="store_true", help="the ranks shard the model (FSDP2), bare loop too")
    gpu.add_argument("--bare-steps", type=int, default=30, help="timed steps of each bare loop")
    gpu.add_argument("--device", default=None, help="cuda, cpu ... (default: CUDA when there is one)")
    gpu.set_defaults(func=cmd_bench_gpu)


def _add_experiment(bench_commands: Any) -> None:
    exp = bench_commands.add_parser("experiment", help="the paper's protocol: strategy x partition x codec")
    exp.add_argument("--out", required=True, help="directory for results.json, results.md and plots")
    exp.add_argument("--quick", action="store_true", help="5 strategies, fixed partition, the default codec, 4 rounds")
    exp.add_argument("--strategies", type=parse_clouds, default=None, help="e.g. fedavg,async")
    exp.add_argument("--partitions", type=parse_clouds, default=None, help="e.g. fixed,dynamic,noniid")
    exp.add_argument("--codecs", type=parse_clouds, default=None, help="e.g. dense,topk:0.01+int8")
    exp.add_argument("--rounds", type=int, default=None, help="sync rounds; every cell applies 3x this")
    exp.add_argument("--local-steps", type=int, default=None)
    exp.add_argument("--slowdown", type=float, default=None, help="the slowed cloud computes this much slower")
    exp.add_argument("--data", default=None)
    exp.add_argument("--eval-tokens", type=int, default=None)
    exp.set_defaults(func=cmd_bench_experiment)


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from fedjet.bench import codec

    result = codec.run(args.params, args.density, args.codec, args.repeats)
    print(json.dumps(codec.as_dict(result)) if args.json else codec.describe(result))
    return 0


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    from fedjet.bench.chaos import config_from, describe, healthy, run

    result = run(config_from(args))
    print(json.dumps(result), flush=True)
    print(describe(result), file=sys.stderr)
    return 0 if healthy(result) else 1


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r:.40}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r:.40}") from None


def cmd_bench_fragments(args: argparse.Namespace) -> int:
    from fedjet.bench.fragments import run

    for row in run(args.params, tuple(args.fragments), args.compute_s):
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"F={row['fragments']}: {row['params']:,} parameters ({row['model_mb']:.0f} MB fp32); coordinator peak "
                f"RSS {row['coordinator_peak_rss_mb']:.0f} MB ({row['peak_vs_model']:.2f}x the model; "
                f"{row['coordinator_rss_before_mb']:.0f} MB before the rounds); peak upload "
                f"{row['peak_up_mb_s']:.1f} MB/s over 1-s windows; {row['seconds']:.1f} s",
                flush=True,
            )
    return 0


def cmd_bench_transport(args: argparse.Namespace) -> int:
    from fedjet.bench.transport import run

    if args.mb < 1:
        raise ConfigError("--mb must be >= 1")
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    model = None if args.coordinator_model == "none" else args.coordinator_model
    result = run(args.mb, args.repeats, model)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['mb']:.0f} MB sealed, chunked, reassembled, opened at {result['mb_s']:.0f} MB/s; raw nats-py "
            f"publishes read by a pull consumer {result['raw_mb_s']:.0f} MB/s ({result['ratio_to_raw']:.2f}x, medians "
            f"of {result['runs']}); coordinator-side reader peak RSS "
            f"{result['peak_rss_mb']:.0f} MB, {result['rss_vs_update']:.2f}x the update above its "
            f"{result['baseline_rss_mb']:.0f} MB baseline; intact: {result['intact']}"
        )
    return 0 if result["intact"] else 1


def cmd_bench_secagg(args: argparse.Namespace) -> int:
    from fedjet.bench.secagg import SecAggBenchConfig, describe, run

    config = SecAggBenchConfig(
        out=Path(args.out), densities=args.densities, rounds=args.rounds, local_steps=args.local_steps,
        data=args.data, members=args.members, params=args.params,
    )  # fmt: skip
    print(describe(run(config)))
    return 0


def cmd_bench_frontier(args: argparse.Namespace) -> int:
    from fedjet.bench.frontier import FrontierConfig, describe, run

    config = FrontierConfig(
        out=Path(args.out), codecs=tuple(args.codecs), rounds=args.rounds, local_steps=args.local_steps,
        seq_len=args.seq_len, batch_size=args.batch_size, model=args.model, seeds=tuple(args.seeds), data=args.data,
        eval_tokens=args.eval_tokens, strategy=args.strategy, server_opt=args.server_opt,
        schedules=tuple(args.schedules), link=args.link, fragments=tuple(args.fragments),
    )  # fmt: skip
    print(describe(run(config)))
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from fedjet.bench.gpu import GpuBenchConfig, run

    config = GpuBenchConfig(
        model=args.model, rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
        seq_len=args.seq_len, precision=args.precision, codec=args.codec, data=args.data, clouds=args.clouds,
        nproc_per_node=args.nproc_per_node, shard=args.shard, bare_steps=args.bare_steps, device=args.device,
    )  # fmt: skip
    print(json.dumps(run(config), default=str))
    return 0


def cmd_bench_experiment(args: argparse.Namespace) -> int:
    from fedjet.bench.experiment import ExperimentConfig, run_experiment

    config = ExperimentConfig.preset(
        args.quick,
        Path(args.out),
        strategies=args.strategies,
        partitions=args.partitions,
        codecs=args.codecs,
        rounds=args.rounds,
        local_steps=args.local_steps,
        slowdown=args.slowdown,
        data=args.data,
        eval_tokens=args.eval_tokens,
    )
    results = run_experiment(config)
    print(f"{len(results['cells'])} cells in {results['elapsed_s']:.0f}s; tables in {Path(args.out) / 'results.md'}")
    return 0
