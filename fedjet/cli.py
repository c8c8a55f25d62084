"""``fedjet`` command line: parse, build config, call. No logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedjet.config.flags import add_config_flags, config_from_args, job_config, overrides_from, parse_names, read_toml
from fedjet.config.job import JobConfig
from fedjet.errors import ConfigError, FedjetError, JobFinished, Terminated
from fedjet.log import configure_logging

parse_clouds = parse_names
PRECISIONS = ("bf16", "fp32")
AGGREGATION_FLAGS = {
    "--strategy", "--temperature", "--alpha-async", "--staleness", "--staleness-a", "--staleness-b",
    "--max-staleness", "--buffer-size", "--server-opt", "--server-lr", "--server-momentum", "--central-dp",
    "--clip-update",
}  # fmt: skip


def parse_assignments(text: str, *, kind: str) -> dict[str, str]:
    """``azure=3,gcp=2`` -> {"azure": "3", "gcp": "2"}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{kind} wants CLOUD=VALUE pairs, got {part!r}")
        out[name.strip()] = value.strip()
    return out


def parse_factors(text: str, *, kind: str) -> dict[str, float]:
    """``azure=3`` -> {"azure": 3.0}, with a clear error for ``azure=abc``."""
    out = {}
    for name, value in parse_assignments(text, kind=kind).items():
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"{kind} {name}={value}: the factor must be a number") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjet", description=__doc__)
    parser.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_up, _add_services, _add_replay, _add_model_io, _add_watch, _add_bench, _add_keys, _add_deploy):
        add(commands)
    return parser


def _add_up(commands: Any) -> None:
    up = commands.add_parser("up", help="run a whole job locally: nats-server, coordinator, workers")
    add_config_flags(up)
    up.add_argument("--nats", default=None, help="use this NATS server instead of starting one")
    up.add_argument("--store", default=None, help="keep the JetStream store in DIR (for replay)")
    up.add_argument("--data", default=None, help="WikiText directory (else $FEDJET_DATA, ./data/wikitext-2)")
    up.add_argument(
        "--data-per-cloud", default="", help="aws=DIR,gcp=DIR,azure=DIR: each cloud trains on its own files"
    )
    up.add_argument("--eval-data", default=None, help="the observer's held-out text (any format --data takes)")
    up.add_argument("--save", default=None, metavar="DIR", help="export the final version as a checkpoint to DIR")
    up.add_argument("--precision", choices=PRECISIONS, default=None, help="bf16 (CUDA default) or fp32")
    up.add_argument("--report", default=None, help="write the JSON report here")
    up.add_argument(
        "--metrics-port", type=int, default=None, help="coordinator's Prometheus port; workers, observer after it"
    )
    up.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per evaluation")
    up.add_argument("--eval-every", type=int, default=1, help="evaluate every N-th version")
    up.add_argument("--slowdown", default="", help="e.g. azure=3: that cloud computes 3x slower")
    up.add_argument("--link", default="", help="e.g. gcp=20mbit/80ms: shape that cloud's link")
    up.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    up.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    up.add_argument("--keys", default=None, help="key directory (default: fresh ephemeral keys)")
    up.add_argument("--quiet", action="store_true", help="print only the summary")
    up.set_defaults(func=cmd_up)


def _add_services(commands: Any) -> None:
    coord = commands.add_parser("coordinator", help="run the coordinator service")
    add_config_flags(coord)
    coord.add_argument("--nats", required=True, help="NATS URL")
    coord.add_argument("--keys", required=True, help="directory with coordinator.key and members' .pub")
    coord.add_argument("--idle-timeout", type=float, default=600.0)
    coord.add_argument("--replicas", type=int, default=None, help="stream copies (default: 3 on a cluster, else 1)")
    coord.add_argument(
        "--state", default=None, metavar="DIR", help="keep the newest published version here: refuse rollbacks"
    )
    coord.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    add_reconnect_flag(coord)
    add_identity_flags(coord)
    coord.set_defaults(func=cmd_coordinator)

    worker = commands.add_parser("worker", help="run one cloud's worker daemon")
    worker.add_argument("--config", default=None, metavar="job.toml", help="take the job name from this file")
    worker.add_argument("--nats", required=True, help="NATS URL")
    worker.add_argument("--job", default=None, help="job name (or give --config)")
    worker.add_argument("--cloud", required=True)
    worker.add_argument("--keys", required=True, help="directory with CLOUD.key and coordinator.pub")
    worker.add_argument("--worker-id", default="0")
    worker.add_argument("--data", default=None, help="this cloud's data: .txt/.md/.jsonl files, WikiText, save_to_disk")
    worker.add_argument("--deal", action="store_true", help="take this cloud's share of one corpus at --data (demo)")
    worker.add_argument("--model", default=None, help="this cloud's copy of the checkpoint (and its tokenizer)")
    worker.add_argument("--precision", choices=PRECISIONS, default=None, help="bf16 (CUDA default) or fp32")
    worker.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    worker.add_argument(
        "--wait-spec", type=float, default=120.0, metavar="S", help="wait this long for the job spec to appear"
    )
    add_reconnect_flag(worker)
    add_identity_flags(worker)
    worker.add_argument("--slowdown", type=float, default=1.0, help="simulate slower compute")
    worker.add_argument("--device", default=None)
    worker.set_defaults(func=cmd_worker)


def _add_replay(commands: Any) -> None:
    replay = commands.add_parser("replay", help="verify or re-aggregate a recorded job from JetStream")
    add_recorded_source(replay)
    replay.add_argument("--job", default=None, help="job to replay (default: the only one recorded)")
    replay.add_argument("--keys", default=None, help="coordinator keys (default: STORE/keys)")
    replay.add_argument("--verify", action="store_true", help="re-apply and compare every version's hash")
    replay.add_argument("--from-version", type=int, default=0)
    replay.add_argument("--until-version", type=int, default=None)
    replay.add_argument("--report", default=None, help="counterfactual: write the JSON report here")
    replay.add_argument("--data", default=None, help="counterfactual: WikiText directory for evaluation")
    replay.add_argument("--eval-data", default=None, help="counterfactual: held-out text (any --data format)")
    replay.add_argument("--model", default=None, help="counterfactual: the job's checkpoint (tokenizer, LoRA base)")
    replay.add_argument("--eval-tokens", type=int, default=16384)
    replay.add_argument("--device", default=None)
    replay.add_argument("--no-progress", action="store_true")
    add_config_flags(replay, only=AGGREGATION_FLAGS, with_file=False)
    add_identity_flags(replay)
    replay.set_defaults(func=cmd_replay)


def _add_model_io(commands: Any) -> None:
    export = commands.add_parser("export", help="write a recorded global version as a standard checkpoint")
    add_recorded_source(export)
    export.add_argument("--job", default=None, help="default: the only one recorded")
    export.add_argument("--version", type=int, default=None, help="default: the newest")
    export.add_argument("--keys", default=None, help="coordinator keys (default: STORE/keys)")
    export.add_argument("--out", required=True, help="the checkpoint directory to write")
    export.add_argument("--model", default=None, help="the checkpoint the job started from (tokenizer, LoRA base)")
    export.add_argument("--merge", action="store_true", help="LoRA: also write the merged full model")
    add_identity_flags(export)
    export.set_defaults(func=cmd_export)

    generate = commands.add_parser("generate", help="print a sample from a checkpoint")
    generate.add_argument("--model", required=True, help="a checkpoint directory (e.g. from fedjet export)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=cmd_generate)


def _add_watch(commands: Any) -> None:
    status = commands.add_parser("status", help="one table of a live or recorded job (--json for scripts)")
    add_recorded_source(status)
    status.add_argument("--job", default=None, help="default: the only one recorded")
    status.add_argument("--keys", default=None, help="a key directory (coordinator's or a member's) to open records")
    status.add_argument("--identity", default=None, help="whose key in --keys to use (default: the coordinator's)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    add_identity_flags(status)
    status.set_defaults(func=cmd_status)


def _add_deploy(commands: Any) -> None:
    from fedjet.deploy.command import add_arguments

    deploy = commands.add_parser("deploy", help="generate deployments")
    targets = deploy.add_subparsers(dest="deploy_command", required=True)
    nats = targets.add_parser("nats", help="a TLS hub cluster, a leaf node per cloud, NKEY identities, permissions")
    add_arguments(nats)
    nats.set_defaults(func=cmd_deploy_nats)


def add_recorded_source(parser: argparse.ArgumentParser) -> None:
    """Where a recorded job is read: a kept store or a running server (exactly one)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="a JetStream store kept by fedjet up --store DIR")
    source.add_argument("--nats", help="a running NATS server (URLs comma-separated)")


def _reconnect_window(text: str) -> float:
    from fedjet.broker.connect import check_reconnect_window

    try:
        return check_reconnect_window(float(text))
    except (ValueError, ConfigError) as e:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r:.20}") from e


def add_reconnect_flag(parser: argparse.ArgumentParser) -> None:
    """How long a service keeps reconnecting through a broker outage before it gives up."""
    parser.add_argument(
        "--reconnect-window", type=_reconnect_window, default=600.0, metavar="S",
        help="keep reconnecting to NATS this long through an outage (default 600)",
    )  # fmt: skip


def add_identity_flags(parser: argparse.ArgumentParser) -> None:
    """Who connects and how: the same flags on every command that talks to NATS."""
    g = parser.add_argument_group("identity (a generated topology: fedjet deploy nats)")
    g.add_argument("--nkey", default=None, metavar="FILE", help="this identity's NKEY seed (mode 0600)")
    g.add_argument("--creds", default=None, metavar="FILE", help="a NATS credentials file instead of --nkey")
    g.add_argument("--tls-ca", default=None, metavar="FILE", help="verify the server against this CA")
    g.add_argument("--tls-cert", default=None, metavar="FILE", help="client certificate (servers that ask)")
    g.add_argument("--tls-key", default=None, metavar="FILE", help="its key (mode 0600)")
    g.add_argument("--js-domain", default=None, help="the hub's JetStream domain (behind a leaf node)")


def identity_from(args: argparse.Namespace) -> Any:
    """A ``ClientAuth`` when any identity flag was given (checked now: files, modes), else None."""
    from fedjet.broker.auth import ClientAuth

    fields = {k: getattr(args, k) for k in ("nkey", "creds", "tls_ca", "tls_cert", "tls_key")}
    return ClientAuth(**fields) if any(fields.values()) else None


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmarks (speed targets live here, not in tests)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    codec = bench_commands.add_parser("codec", help="wire size and speed of the update codec")
    codec.add_argument("--params", type=int, default=10_000_000)
    codec.add_argument("--density", type=float, default=0.01)
    codec.add_argument("--codec", default=None, help="default topk:DENSITY+int8")
    codec.add_argument("--repeats", type=int, default=5)
    codec.add_argument("--json", action="store_true", help="print one JSON object")
    codec.set_defaults(func=cmd_bench_codec)

    frontier = bench_commands.add_parser("frontier", help="final eval loss against whole-run bytes, per codec")
    frontier.add_argument("--out", required=True, help="directory for results.json, frontier.md, frontier.png")
    frontier.add_argument("--codecs", type=parse_clouds, default=("dense", "topk:0.01+int8"), help="comma-separated")
    frontier.add_argument("--rounds", type=int, default=5)
    frontier.add_argument("--local-steps", type=int, default=20)
    frontier.add_argument("--seq-len", type=int, default=128)
    frontier.add_argument("--batch-size", type=int, default=8)
    frontier.add_argument("--model", default="tiny")
    frontier.add_argument("--seed", type=int, default=0)
    frontier.add_argument("--data", default=None)
    frontier.add_argument("--eval-tokens", type=int, default=16384)
    frontier.add_argument("--strategy", default="fedavg")
    frontier.add_argument("--server-opt", default="sgd")
    frontier.add_argument("--schedules", type=parse_clouds, default=("wait",), help="wait,overlap: rows per schedule")
    frontier.add_argument("--link", default="", help="every cloud behind this link, e.g. 20mbit/80ms")
    frontier.set_defaults(func=cmd_bench_frontier)

    transport = bench_commands.add_parser("transport", help="one big update through JetStream vs raw publishes")
    transport.add_argument("--mb", type=int, default=400, help="update size in MB (default 400)")
    transport.add_argument("--json", action="store_true", help="print one JSON object")
    transport.set_defaults(func=cmd_bench_transport)

    sa = bench_commands.add_parser("secagg", help="what --secure-agg costs in bytes, time and loss, per round")
    sa.add_argument("--out", required=True, help="directory for secagg.json and secagg.md")
    sa.add_argument("--densities", type=_floats, default=(1.0, 0.1), help="secure rows' densities, comma-separated")
    sa.add_argument("--rounds", type=int, default=3)
    sa.add_argument("--local-steps", type=int, default=10)
    sa.add_argument("--data", default=None)
    sa.add_argument("--members", type=_ints, default=(3, 10, 30), help="protocol-only rows: members per round")
    sa.add_argument("--params", type=int, default=1_000_000, help="protocol-only rows: coordinates per member")
    sa.set_defaults(func=cmd_bench_secagg)

    from fedjet.bench.chaos_flags import build_parser as chaos_flags

    chaos = bench_commands.add_parser("chaos", help="a job under SIGKILLs and nats restarts, audited for loss")
    chaos_flags(chaos)
    chaos.set_defaults(func=cmd_bench_chaos)

    gpu = bench_commands.add_parser("gpu", help="fedjet's tokens/s on one GPU against a bare loop of the same model")
    gpu.add_argument("--model", default="base", help="preset or checkpoint (default: base, 85M parameters)")
    gpu.add_argument("--rounds", type=int, default=4)
    gpu.add_argument("--local-steps", type=int, default=20)
    gpu.add_argument("--batch-size", type=int, default=16)
    gpu.add_argument("--seq-len", type=int, default=256)
    gpu.add_argument("--precision", choices=PRECISIONS, default=None)
    gpu.add_argument("--codec", default="topk:0.01+int8")
    gpu.add_argument("--data", default=None)
    gpu.set_defaults(func=cmd_bench_gpu)

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


def _add_keys(commands: Any) -> None:
    keys = commands.add_parser(
        "keys",
        help="key management",
        description="Each party makes its own key pair where it runs and hands out only its .pub: "
        "'keys generate --cloud NAME' (or --coordinator) on each machine, then 'keys add' the others' .pub files.",
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser(
        "generate",
        help="write a key pair (NAME.key 0600, NAME.pub)",
        description="--cloud NAME / --coordinator: this party's own pair, on its own machine (production). "
        "--clouds a,b,c: every party's pair in one directory, for one operator running them all (fedjet up).",
    )
    generate.add_argument("--out", required=True, help="directory to write NAME.key / NAME.pub into")
    who = generate.add_mutually_exclusive_group(required=True)
    who.add_argument("--cloud", default=None, help="only this identity's pair (a cloud or observer)")
    who.add_argument("--coordinator", action="store_true", help="only the coordinator's pair")
    who.add_argument("--clouds", type=parse_clouds, default=None, help="every pair: coordinator, clouds, observers")
    generate.add_argument("--observers", type=parse_clouds, default=("eval",), help="with --clouds (default eval)")
    generate.add_argument("--if-missing", action="store_true", help="do nothing if the keys already exist")
    generate.set_defaults(func=cmd_keys_generate)
    add = keys_commands.add_parser(
        "add",
        help="copy other parties' public keys (NAME.pub) into a key directory",
        description="Refuses a secret key, a file that is not a fedjet public key, and a key that would "
        "replace a different one of the same name.",
    )
    add.add_argument("files", nargs="+", metavar="FILE.pub", help="public key files handed out by the others")
    add.add_argument("--out", required=True, help="the key directory to add them to")
    add.set_defaults(func=cmd_keys_add)


def cmd_replay(args: argparse.Namespace) -> int:
    from fedjet.runner.replay import ReplayConfig, print_summary, replay_counterfactual, verify_recording

    overrides = overrides_from(args)
    config = ReplayConfig(
        store=args.store,
        nats_url=args.nats,
        job=args.job,
        keys=args.keys,
        verify=args.verify,
        strategy=job_config(overrides=overrides).strategy if "strategy" in overrides else None,
        from_version=args.from_version,
        until_version=args.until_version,
        report=args.report,
        data=args.data,
        eval_data=args.eval_data,
        model=args.model,
        eval_tokens=args.eval_tokens,
        device=args.device,
        progress=not args.no_progress,
        auth=identity_from(args),
        js_domain=args.js_domain,
    )
    if config.verify:
        result = verify_recording(config).to_dict()
        print_summary(result)
        return 1 if result["mismatches"] else 0
    replay_counterfactual(config)
    if args.report:
        print(f"report written to {args.report}")
    return 0


def cmd_bench_codec(args: argparse.Namespace) -> int:
    import json

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


def cmd_bench_transport(args: argparse.Namespace) -> int:
    from fedjet.bench.transport import run

    if args.mb < 1:
        raise ConfigError("--mb must be >= 1")
    result = run(args.mb)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['mb']:.0f} MB sealed, chunked, reassembled, opened at {result['mb_s']:.0f} MB/s; raw nats-py "
            f"publishes {result['raw_mb_s']:.0f} MB/s ({result['ratio_to_raw']:.2f}x); coordinator peak RSS "
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
        seq_len=args.seq_len, batch_size=args.batch_size, model=args.model, seed=args.seed, data=args.data,
        eval_tokens=args.eval_tokens, strategy=args.strategy, server_opt=args.server_opt,
        schedules=tuple(args.schedules), link=args.link,
    )  # fmt: skip
    print(describe(run(config)))
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    import json

    from fedjet.bench.gpu import GpuBenchConfig, run

    config = GpuBenchConfig(
        model=args.model, rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
        seq_len=args.seq_len, precision=args.precision, codec=args.codec, data=args.data,
    )  # fmt: skip
    print(json.dumps(run(config), default=str))
    return 0


def cmd_bench_experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

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


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedjet.codecs.crypto import COORDINATOR
    from fedjet.keystore import generate, generate_one

    own = COORDINATOR if args.coordinator else args.cloud
    first = own if own is not None else COORDINATOR
    if args.if_missing and (Path(args.out) / f"{first}.key").exists():
        print(f"keys already in {args.out}; leaving them")
        return 0
    written = generate_one(args.out, own) if own is not None else generate(args.out, [*args.clouds, *args.observers])
    for path in written:
        print(path)
    if own is not None:
        print(f"hand out {Path(args.out) / (own + '.pub')} only; add the others' with: fedjet keys add FILE.pub ...")
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    from fedjet.keystore import add_public

    written = add_public(args.out, args.files)
    for path in written:
        print(path)
    print(f"{len(written)} public key(s) added to {args.out} (a key already there is left as it is)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedjet.observe.status import status_command

    auth = identity_from(args)
    return asyncio.run(
        status_command(
            args.nats,
            args.job,
            args.keys,
            args.store,
            args.json,
            auth=auth,
            domain=args.js_domain,
            identity=args.identity,
        )
    )


def cmd_deploy_nats(args: argparse.Namespace) -> int:
    from fedjet.deploy.command import deploy_command

    return deploy_command(args)


def cmd_export(args: argparse.Namespace) -> int:
    from fedjet.runner.export import ExportConfig, run_export

    config = ExportConfig(
        out=args.out, store=args.store, nats_url=args.nats, job=args.job, keys=args.keys,
        version=args.version, model=args.model, merge=args.merge, auth=identity_from(args), js_domain=args.js_domain,
    )  # fmt: skip
    exported = run_export(config)
    print(f"exported {exported.job} version {exported.version} to {exported.out} (weights {exported.weights_sha256})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedjet.models.generate import generate_text

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    print(generate_text(args.model, args.prompt, args.max_new_tokens, args.seed, temperature=args.temperature))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    job = config_from_args(args)  # a wrong flag fails here, before anything heavy is imported
    slowdown = parse_factors(args.slowdown, kind="--slowdown")
    data_per_cloud = parse_assignments(args.data_per_cloud, kind="--data-per-cloud")
    from fedjet.runner.up_config import UpConfig

    config = UpConfig(
        job=job,
        nats_url=args.nats,
        store=args.store,
        data=args.data,
        report=args.report,
        eval_tokens=args.eval_tokens,
        eval_every=args.eval_every,
        slowdown=slowdown,
        data_per_cloud=data_per_cloud,
        eval_data=args.eval_data,
        save=args.save,
        precision=args.precision,
        metrics_port=args.metrics_port,
        links=parse_assignments(args.link, kind="--link"),
        timeout_s=args.timeout,
        device=args.device,
        keys=args.keys,
        quiet=args.quiet,
    )
    from fedjet.models.job_model import validate_model_source
    from fedjet.runner.up import run_up

    validate_model_source(job)
    run_up(config)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedjet.coordinator.service import Coordinator, CoordinatorConfig
    from fedjet.keystore import coordinator_boxes
    from fedjet.lifecycle import run_until_signalled
    from fedjet.models.job_model import initial_job_model, spec_for
    from fedjet.observe.metrics import CoordinatorMetrics

    job = config_from_args(args)
    auth = identity_from(args)
    jm = initial_job_model(job)
    spec, weights = spec_for(job, jm), jm.exchanged()
    metrics = CoordinatorMetrics() if args.metrics_port is not None else None
    coordinator = Coordinator(
        CoordinatorConfig(
            nats_url=args.nats,
            spec=spec,
            boxes=coordinator_boxes(args.keys, [*spec.clouds, *spec.observers]),
            idle_timeout_s=args.idle_timeout,
            auth=auth,
            js_domain=args.js_domain,
            reconnect_window_s=args.reconnect_window,
            replicas=args.replicas,
            metrics=metrics,
            state_dir=args.state,
        )
    )
    with _metrics_served(metrics, args.metrics_port):
        asyncio.run(run_until_signalled(lambda: coordinator.run(weights), coordinator.stop))
    return 0


@contextlib.contextmanager
def _metrics_served(metrics: Any, port: int | None) -> Iterator[None]:
    """Serve ``metrics`` on ``port`` for the life of the command (nothing when no port)."""
    if metrics is None or port is None:
        yield
        return
    from fedjet.observe.metrics import serve_metrics

    server = serve_metrics(metrics.registry, port)
    try:
        yield
    finally:
        server.close()


def cmd_worker(args: argparse.Namespace) -> int:
    from fedjet.lifecycle import serve
    from fedjet.observe.metrics import WorkerMetrics
    from fedjet.worker.daemon import Worker, WorkerConfig

    job = args.job or _job_from_file(args.config)
    metrics = WorkerMetrics(args.cloud) if args.metrics_port is not None else None
    worker = Worker(
        WorkerConfig(
            nats_url=args.nats,
            job=job,
            cloud=args.cloud,
            keys=args.keys,
            worker_id=args.worker_id,
            data=args.data,
            deal=args.deal,
            model=args.model,
            slowdown=args.slowdown,
            device=args.device,
            precision=args.precision,
            auth=identity_from(args),
            js_domain=args.js_domain,
            reconnect_window_s=args.reconnect_window,
            metrics=metrics,
            spec_timeout_s=args.wait_spec,
        )
    )
    with _metrics_served(metrics, args.metrics_port):
        asyncio.run(serve(worker))
    return 0


def _job_from_file(path: str | None) -> str:
    if path is None:
        raise ConfigError("give --job NAME or --config job.toml")
    job = read_toml(Path(path)).get("job")
    if not isinstance(job, str):
        raise ConfigError(f'--config {path} names no job (a top-level job = "NAME")')
    return JobConfig(job=job).job


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted: everything was shut down", file=sys.stderr)
        return 130
    except Terminated as e:
        print(str(e), file=sys.stderr)
        return 143
    except JobFinished as e:  # a restart after the final version: done, not an error
        print(f"fedjet: {e}", file=sys.stderr)
        return 0
    except FedjetError as e:
        print(f"fedjet: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
