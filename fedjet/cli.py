"""``fedjet`` command line: parse, build config, call. No logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Any

from fedjet.bench.commands import add_bench
from fedjet.commands import (
    cmd_coordinator,
    cmd_deploy_nats,
    cmd_export,
    cmd_generate,
    cmd_keys_add,
    cmd_keys_generate,
    cmd_replay,
    cmd_status,
    cmd_up,
    cmd_worker,
)
from fedjet.config.flags import add_config_flags, parse_names
from fedjet.errors import ConfigError, FedjetError, JobFinished, Terminated
from fedjet.log import configure_logging

parse_clouds = parse_names
PRECISIONS = ("bf16", "fp32")
AGGREGATION_FLAGS = {
    "--strategy", "--temperature", "--alpha-async", "--staleness", "--staleness-a", "--staleness-b",
    "--max-staleness", "--buffer-size", "--server-opt", "--server-lr", "--server-momentum", "--central-dp",
    "--clip-update",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjet", description=__doc__)
    parser.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_up, _add_services, _add_replay, _add_model_io, _add_watch, add_bench, _add_keys, _add_deploy):
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
    up.add_argument("--nproc-per-node", type=int, default=1, help="ranks per cloud's worker (torch.distributed)")
    up.add_argument("--shard", action="store_true", help="the ranks shard the model (FSDP2) instead of DDP")
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
    worker.add_argument(
        "--nproc-per-node", type=int, default=1, help="ranks training this cloud's model together (torch.distributed)"
    )
    worker.add_argument(
        "--shard", action="store_true", help="FSDP2 over the ranks instead of DDP (a model too big for one device)"
    )
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
    replay.add_argument(
        "--without",
        type=parse_names,
        default=(),
        metavar="CLOUDS",
        help="counterfactual: leave these clouds' updates out",
    )
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


def run() -> None:
    """The ``fedjet`` command: :func:`main`, then :func:`exit_now` with its code."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Flush, then leave without the interpreter's teardown: with torch and transformers
    loaded, tearing down their module graph costs one to two seconds of CPU at every exit, and
    nothing this process holds needs it (children are stopped, files closed, streams flushed)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say to it
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
