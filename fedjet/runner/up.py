"""``fedjet up``: a local nats-server, the coordinator and one worker process per cloud.

This process supervises the others and plays observer: it evaluates every global version on
the held-out split and writes the report. Children run in their own sessions and are stopped
with SIGTERM (then SIGKILL) on exit, Ctrl-C or failure, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedjet.broker.jetstream import close_quietly, connect, redact_url
from fedjet.broker.proxy import LinkShape, ShapingProxy
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.socket_bytes import socket_bytes_of
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.kv import await_spec, read_coordinator_stats, read_stats
from fedjet.codecs.crypto import COORDINATOR
from fedjet.codecs.frame import Limits
from fedjet.config.flags import to_toml
from fedjet.config.wire import to_wire
from fedjet.coordinator.central_dp import central_report
from fedjet.data.wikitext import load_corpus, resolve_data_dir
from fedjet.errors import FedjetError, Terminated
from fedjet.keystore import generate, load_identity, member_boxes
from fedjet.log import get_logger
from fedjet.metrics import ObserverMetrics, serve_metrics
from fedjet.models.build import quiet_transformers
from fedjet.observe.live import LiveView
from fedjet.report import Report, run_bytes, summarize
from fedjet.runner.collect import Collector, print_round
from fedjet.runner.evaluate import Evaluator
from fedjet.runner.processes import Child, spawn, stop_all
from fedjet.runner.up_config import UpConfig

log = get_logger("fedjet.up")
FINISH_WAIT_S = 120.0  # for every process of the run to exit once the last version is out
__all__ = ["RunFailed", "UpConfig", "run_up"]


class RunFailed(FedjetError):
    """A child process died or the run timed out."""


def run_up(config: UpConfig) -> Report:
    """Blocking entry point; raises on failure. Ctrl-C (``KeyboardInterrupt``) and SIGTERM
    (:class:`Terminated`) stop every child process and the embedded server first."""
    try:
        return asyncio.run(_run(config))
    except asyncio.CancelledError as e:
        raise Terminated("terminated: everything was shut down") from e


async def _run(config: UpConfig) -> Report:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    quiet_transformers()
    data_dir = resolve_data_dir(config.data)
    corpus = None
    if not config.data_per_cloud or config.eval_data is None:  # dealt to the clouds, or evaluated on
        corpus = await asyncio.to_thread(load_corpus, data_dir)
        if corpus.note:
            _say(config, f"note: {corpus.note}")
    server = None
    url = config.nats_url
    if url is None:
        server = EmbeddedNatsServer(config.store)
        url = server.start()
        _say(
            config,
            f"nats-server (JetStream) on {url}, store {config.store or '(temporary)'}",
        )
    workdir = Path(tempfile.mkdtemp(prefix="fedjet-up-"))
    children: list[Child] = []
    proxies: list[ShapingProxy] = []
    finished = False
    try:
        keys = config.keys or _run_keys(config, workdir)
        worker_urls = await _shape_links(config, url, proxies)
        _spawn_all(config, url, worker_urls, data_dir, workdir, keys, children)
        report = await _observe(config, url, corpus, children, keys)
        print(_summary_line(report), flush=True)
        if config.save:
            exported = await _save(config, url, keys)
            report.summary["saved"] = {
                "dir": exported.out,
                "version": exported.version,
                "hash": exported.weights_sha256,
            }
            _say(config, f"model (version {exported.version}) saved to {exported.out}")
        if config.report:
            report.write(config.report)
            _say(config, f"report written to {config.report}")
        finished = True
        return report
    finally:
        stop_all(children)
        for proxy in proxies:
            await proxy.stop()
        if server is not None:
            server.stop()
        if finished and all(c.returncode == 0 for c in children):
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # a run that failed keeps its logs, and says where, quiet or not
            codes = ", ".join(f"{c.name}={c.returncode}" for c in children)
            print(
                f"exit codes {codes}; logs kept in {workdir}",
                file=sys.stderr if config.quiet else sys.stdout,
                flush=True,
            )


def _run_keys(config: UpConfig, workdir: Path) -> str:
    """Fresh keys for this run. With ``--store DIR`` they are kept in ``DIR/keys`` (replay needs
    the coordinator's key); otherwise they vanish with the run's temporary directory."""
    directory = Path(config.store) / "keys" if config.store else workdir / "keys"
    if not (directory / "coordinator.key").exists():
        generate(directory, [*config.job.clouds, *config.job.observers])
    return str(directory)


async def _shape_links(config: UpConfig, url: str, proxies: list[ShapingProxy]) -> dict[str, str]:
    """Each cloud's NATS URL: direct, or through a shaping proxy for ``--link`` clouds."""
    target = urlsplit(url)
    urls = {}
    for cloud in config.job.clouds:
        if cloud not in config.links:
            urls[cloud] = url
            continue
        shape = LinkShape.parse(config.links[cloud])
        proxy = ShapingProxy(target.hostname or "127.0.0.1", target.port or 4222, shape)
        port = await proxy.start()
        proxies.append(proxy)
        urls[cloud] = f"nats://127.0.0.1:{port}"
        _say(config, f"{cloud} reaches NATS through a {config.links[cloud]} link on port {port}")
    return urls


def _spawn_all(
    config: UpConfig,
    url: str,
    worker_urls: dict[str, str],
    data_dir: Path | None,
    workdir: Path,
    keys: str,
    children: list[Child],
) -> None:
    """Start the coordinator and the workers, appending each to ``children`` as soon as it
    runs, so a failure half-way still stops the ones already started."""
    opts = config.job
    device = ["--device", config.device] if config.device else []
    job_file = workdir / "job.toml"  # the coordinator reads the one validated config tree
    job_file.write_text(to_toml(opts))
    coordinator_args = ["coordinator", "--nats", url, "--keys", keys, "--config", str(job_file)]
    port = config.metrics_port  # the coordinator's; worker i serves on port + 1 + i
    children.append(spawn("coordinator", coordinator_args + _metrics_flag(port, 0), workdir))
    for i, cloud in enumerate(opts.clouds):
        args = ["worker", "--nats", worker_urls[cloud], "--job", opts.job, "--cloud", cloud, "--keys", keys, *device]
        args += _metrics_flag(port, 1 + i)
        if config.data_per_cloud:
            args += ["--data", config.data_per_cloud[cloud]]
        else:
            args += ["--deal", *(["--data", str(data_dir)] if data_dir is not None else [])]
        if config.model_path is not None:
            args += ["--model", config.model_path]
        if config.precision is not None:
            args += ["--precision", config.precision]
        if cloud in config.slowdown:
            args += ["--slowdown", str(config.slowdown[cloud])]
        if config.nproc_per_node > 1:
            args += ["--nproc-per-node", str(config.nproc_per_node)]
        if config.shard:
            args += ["--shard"]
        children.append(spawn(f"worker-{cloud}", args, workdir))


def _metrics_flag(port: int | None, offset: int) -> list[str]:
    return [] if port is None else ["--metrics-port", str(port + offset)]


def _round_sink(config: UpConfig, records: Callable[[], Any]) -> tuple[Callable[[Any], None] | None, Any, Any]:
    """What to do with each evaluated version: a live view on a terminal, plain lines off one,
    observer metrics with ``--metrics-port``. Returns (on_round, live view, metrics server)."""
    opts = config.job
    live = (
        None
        if config.quiet
        else LiveView.for_terminal(
            job=opts.job, clouds=opts.clouds, target_versions=opts.stop.rounds, target_updates=opts.stop.max_updates
        )
    )
    metrics, server = None, None
    if config.metrics_port is not None:
        metrics = ObserverMetrics()
        server = serve_metrics(metrics.registry, config.metrics_port + 1 + len(opts.clouds))

    def on_round(record: Any) -> None:
        if live is not None:
            live.update(record, records())
        elif not config.quiet:
            print_round(record)
        if metrics is not None:
            metrics.version(record.version)
            if record.eval_loss is not None:
                metrics.eval_loss(record.eval_loss)

    return on_round, live, server


async def _observe(config: UpConfig, url: str, corpus: Any, children: list[Child], keys: str) -> Report:
    opts = config.job
    subjects = JobSubjects(opts.job)
    boxes = member_boxes(keys, opts.observers[0])
    nc = await connect(url, f"fedjet-up-{opts.job}")
    started = time.perf_counter()
    try:
        js = nc.jetstream()
        spec = await await_spec(js, subjects, boxes.public_of(COORDINATOR), 180.0, lambda: _check_children(children))
        evaluator = await asyncio.to_thread(
            lambda: Evaluator.build(
                spec,
                eval_tokens=config.eval_tokens,
                eval_data=config.eval_data,
                corpus=corpus,
                model_path=config.model_path,
                device=config.device,
            )
        )
        own = {n: t.clone() for n, t in evaluator.job_model.exchanged().items()}
        limits = Limits.for_model(sum(t.numel() for t in own.values()), len(own))
        follower = GlobalFollower(js, subjects, boxes, limits, every=True)
        follower.hold_local(0, own)
        await follower.start()
        on_round, live, server = _round_sink(config, lambda: collector.last_record)
        collector = Collector(
            follower,
            evaluator,
            clouds=len(opts.clouds),
            eval_every=config.eval_every,
            on_round=on_round,
            coordinator=load_identity(keys, COORDINATOR).box,  # fedjet up made every key: it may read the losses
        )
        try:
            await _race(collector.run(), children, config.timeout_s)
        finally:
            if live is not None:
                live.close()
            if server is not None:
                server.close()
        await follower.stop()
        clouds, processes, coordinator_peak_mb = await _process_stats(js, subjects, opts.clouds, children, observer=nc)
    finally:
        await close_quietly(nc)
    rejected = collector.last_record.rejected_total if collector.last_record else 0
    report = Report(config=_config_dict(config, corpus), rounds=collector.rounds, clouds=clouds)
    report.privacy = collector.privacy()
    central = config.job.strategy.central_dp_config
    if central is not None and collector.rounds:
        report.privacy = {**(report.privacy or {}), "central": central_report(central, collector.rounds[-1].version)}
    report.summary = {**summarize(collector.rounds, rejected), **run_bytes(clouds, processes)}
    report.summary["coordinator_peak_rss_mb"] = coordinator_peak_mb
    report.summary["run_s"] = time.perf_counter() - started
    if corpus is not None and corpus.note:
        report.notes.append(corpus.note)
    return report


async def _race(work: Any, children: list[Child], timeout_s: float) -> None:
    """Run ``work`` while watching the children: a crashed child or the timeout ends the run."""
    task = asyncio.ensure_future(work)
    deadline = time.monotonic() + timeout_s
    try:
        while not task.done():
            _check_children(children)
            if time.monotonic() > deadline:
                raise RunFailed(f"run did not finish within {timeout_s}s")
            await asyncio.wait({task}, timeout=0.5)
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _check_children(children: list[Child]) -> None:
    """A child that exited with an error ends the run (a clean exit is a finished part)."""
    for child in children:
        code = child.returncode
        if code is not None and code != 0:
            raise RunFailed(f"{child.name} exited with {code}:\n{child.log_tail()}")


async def _process_stats(
    js: Any, subjects: JobSubjects, clouds: tuple[str, ...], children: list[Child], *, observer: Any
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], float]:
    """Wait for the workers and the coordinator to finish, then read their own figures from the
    KV bucket: each cloud's, the socket bytes of every process of the job (workers, coordinator
    and this observer) and the coordinator's peak resident set. A process that reported none
    fails the run."""
    deadline = time.monotonic() + FINISH_WAIT_S
    while any(c.returncode is None for c in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    _check_children(children)
    running = [c.name for c in children if c.returncode is None]
    if running:  # their figures are put at their exit: reading now would call them missing
        raise RunFailed(f"{', '.join(running)} still running {FINISH_WAIT_S:.0f} s after the last version")
    clouds_stats = await read_stats(js, subjects, clouds)
    coordinator = await read_coordinator_stats(js, subjects)
    processes = {f"worker-{cloud}": _socket_figures(clouds_stats[cloud], f"worker-{cloud}") for cloud in clouds}
    processes["coordinator"] = _socket_figures(coordinator, "coordinator")
    processes["observer"] = socket_bytes_of(observer).figures()
    try:
        coordinator_peak_mb = float(coordinator["peak_rss_mb"])
    except (KeyError, TypeError, ValueError):
        raise RunFailed("the coordinator reported no peak resident set") from None
    return clouds_stats, processes, coordinator_peak_mb


def _socket_figures(stats: dict[str, Any], process: str) -> dict[str, int]:
    try:
        return {"socket_in": int(stats["socket_in"]), "socket_out": int(stats["socket_out"])}
    except (KeyError, TypeError, ValueError):
        raise RunFailed(f"{process} reported no socket bytes: the run's byte count would be short") from None


def _config_dict(config: UpConfig, corpus: Any) -> dict[str, Any]:
    return {
        **to_wire(config.job),
        "strategy": config.job.strategy.name,  # flat keys that report readers use
        "strategy_config": to_wire(config.job.strategy),
        "rounds": config.job.stop.rounds,
        "max_updates": config.job.stop.max_updates,
        "data": dict(config.data_per_cloud) if config.data_per_cloud else corpus.source if corpus else None,
        "train_split": None if config.data_per_cloud or corpus is None else corpus.train_split,
        "eval_split": config.eval_data or (corpus.eval_split if corpus else None),
        "eval_tokens": config.eval_tokens,
        "slowdown": config.slowdown,
        "links": config.links,
        "nats": "embedded" if config.nats_url is None else redact_url(config.nats_url),
    }


async def _save(config: UpConfig, url: str, keys: str) -> Any:
    """Export the final version from the live server, as ``fedjet export`` would."""
    from fedjet.runner.export import ExportConfig, export_version

    assert config.save is not None
    nc = await connect(url, f"fedjet-save-{config.job.job}")
    try:
        export = ExportConfig(out=config.save, nats_url=url, model=config.model_path)
        return await export_version(nc.jetstream(), JobSubjects(config.job.job), keys, export)
    finally:
        await close_quietly(nc)


def _summary_line(report: Report) -> str:
    s = report.summary
    return (
        f"done: {s['versions']} versions, {s['updates_applied']} updates applied, "
        f"{s['updates_rejected']} rejected; eval loss {s['initial_eval_loss']:.4f} -> "
        f"{s['final_eval_loss']:.4f} (ppl {s['final_eval_ppl']:.2f}, acc {100 * s['final_eval_acc']:.1f}%); "
        f"up {s['bytes_up'] / 1e6:.3f} MB, down {s['bytes_down'] / 1e6:.3f} MB; {s['wall_s']:.1f}s"
    )


def _say(config: UpConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)
