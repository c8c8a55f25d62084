"""What each ``fedjet`` command does once its flags are parsed (:mod:`fedjet.cli` builds the
parser). Heavy modules are imported inside each handler, so ``fedjet --help`` stays fast."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedjet.config.flags import config_from_args, job_config, overrides_from, read_toml
from fedjet.config.job import JobConfig
from fedjet.errors import ConfigError


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


def identity_from(args: argparse.Namespace) -> Any:
    """A ``ClientAuth`` when any identity flag was given (checked now: files, modes), else None."""
    from fedjet.broker.auth import ClientAuth

    fields = {k: getattr(args, k) for k in ("nkey", "creds", "tls_ca", "tls_cert", "tls_key")}
    return ClientAuth(**fields) if any(fields.values()) else None


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
        without=tuple(args.without),
    )
    if config.verify:
        result = verify_recording(config).to_dict()
        print_summary(result)
        return 1 if result["mismatches"] else 0
    replay_counterfactual(config)
    if args.report:
        print(f"report written to {args.report}")
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
        nproc_per_node=args.nproc_per_node,
        shard=args.shard,
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
    from fedjet.models.presets import validate_model_source
    from fedjet.runner.processes import start_launcher

    validate_model_source(job)
    start_launcher()  # it imports torch and transformers for the children while this process does
    from fedjet.runner.up import run_up

    run_up(config)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedjet.coordinator.service import Coordinator, CoordinatorConfig
    from fedjet.keystore import coordinator_boxes
    from fedjet.lifecycle import run_until_signalled
    from fedjet.malloc import keep_big_buffers_mapped
    from fedjet.metrics import CoordinatorMetrics

    job = config_from_args(args)
    auth = identity_from(args)
    keep_big_buffers_mapped()
    spec, weights = _version_zero(job)
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
        handed = [weights]  # the coordinator holds version 0 alone (see _version_zero)
        del weights
        asyncio.run(run_until_signalled(lambda: coordinator.run(handed.pop()), coordinator.stop))
    return 0


def _version_zero(job: Any) -> tuple[Any, Any]:
    """The spec and version 0's weights, without the model object they came from: it would
    keep every original parameter alive as the versions replace them (a second model copy in
    the coordinator by the time each tensor had changed once)."""
    from fedjet.models.job_model import initial_job_model, spec_for
    from fedjet.models.presets import PRESETS

    jm = initial_job_model(job)
    spec, weights = spec_for(job, jm), jm.exchanged()
    if job.model not in PRESETS:  # off the checkpoint file's mapping: it is unmapped only when the
        weights = {n: t.clone() for n, t in weights.items()}  # last tensor on it goes, not tensor by tensor
    return spec, weights


@contextlib.contextmanager
def _metrics_served(metrics: Any, port: int | None) -> Iterator[None]:
    """Serve ``metrics`` on ``port`` for the life of the command (nothing when no port)."""
    if metrics is None or port is None:
        yield
        return
    from fedjet.metrics import serve_metrics

    server = serve_metrics(metrics.registry, port)
    try:
        yield
    finally:
        server.close()


def cmd_worker(args: argparse.Namespace) -> int:
    from fedjet.lifecycle import serve
    from fedjet.metrics import WorkerMetrics
    from fedjet.worker.cluster import RankSettings, exit_without_teardown, follow_launched, launched_place
    from fedjet.worker.daemon import Worker, WorkerConfig

    job = args.job or _job_from_file(args.config)
    place = launched_place()  # started by torchrun as one of several ranks
    if place is not None and args.nproc_per_node != 1:
        raise ConfigError(
            f"started by a launcher as rank {place.rank} of {place.world}: the launcher's ranks are the cloud's; "
            "leave out --nproc-per-node"
        )
    if place is not None and place.rank > 0:  # a rank that trains beside rank 0 and never speaks NATS
        settings = RankSettings(
            cloud=args.cloud, data=args.data, deal=args.deal, model=args.model, device=args.device,
            precision=args.precision, shard=args.shard,
        )  # fmt: skip
        follow_launched(place, settings)
        return 0
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
            nproc_per_node=args.nproc_per_node if place is None else place.world,
            launched=place is not None,
            shard=args.shard,
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
    if worker.grouped:  # its figures are reported and its NATS connection closed
        exit_without_teardown()
    return 0


def _job_from_file(path: str | None) -> str:
    if path is None:
        raise ConfigError("give --job NAME or --config job.toml")
    job = read_toml(Path(path)).get("job")
    if not isinstance(job, str):
        raise ConfigError(f'--config {path} names no job (a top-level job = "NAME")')
    return JobConfig(job=job).job
