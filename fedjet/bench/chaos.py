"""``fedjet bench chaos``: a real job while its servers fail, then an audit of the recording.

A nats-server with JetStream on loopback, the coordinator and one worker per cloud run as
separate processes, as in production. While the job runs the coordinator is SIGKILLed ``K``
times at random moments (and restarted with the same command), the nats-server is stopped with
SIGTERM and started again on the same store and port, and workers are SIGKILLed and restarted.
When the job has finished, the recording is read back and every update a worker sent is
accounted for; ``fedjet replay --verify`` then re-applies every version.

The audit, on the coordinator's key (so it opens what the coordinator opened):

* ``sent``: update blobs in the UPDATES stream that authenticate (a member's key on its own
  subject), each identified by (cloud, worker, seq) and placed at its last chunk's stream seq.
* ``applied``: contributions over all version records; ``doubled``: extra appearances of one
  (cloud, worker, seq) in the records (the same update applied in two versions, or twice in one).
* ``rejected``: the newest record's counts per reason. The records also list each rejection's
  stream seq (``dropped``, at most 64 per version); ``rejected_recounted`` counts stream seqs
  listed in two versions (a rejection counted again after a restart).
* ``lost``: sent updates placed before the newest record's ``resume_from`` (the coordinator's
  claim that everything before it is decided) that no record applies and no record lists as
  rejected. Exact while no record hit the 64-entry list cap (``rejected_listed_complete``);
  otherwise an upper bound.
* ``undecided_at_end``: sent updates at or after ``resume_from``, neither applied nor rejected:
  never read because the job ended first (sent while the final version was made; with
  ``async``, also the backlog that workers built up while the coordinator was down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors

from fedjet.bench.chaos_flags import build_parser
from fedjet.broker.blobs import BlobAssembler
from fedjet.broker.jetstream import close_quietly, connect, read_range
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.codecs.crypto import COORDINATOR, PublicIdentity, envelope_limit
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHead
from fedjet.codecs.record import VersionRecord
from fedjet.coordinator.admission import Admission
from fedjet.errors import BrokerError, ConfigError, FedjetError
from fedjet.keystore import generate, load_public
from fedjet.log import configure_logging
from fedjet.runner.processes import Child, spawn, stop_all
from fedjet.runner.recorded import coordinator_view

LISTED_PER_VERSION = 64  # fedjet.coordinator.record.MAX_DROPPED_LISTED
FINISHED = "has finished"  # what a coordinator restarted after the final version says
MAX_CRASHES = 10  # restarted each time; beyond this the run stops
EARLY_KILLS = 0.25  # share of coordinator kills that land while the restarted coordinator resumes


class ChaosFailed(FedjetError):
    """The job did not finish under chaos (timeout, or no progress)."""


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    coordinator_kills: int = 20
    nats_restarts: int = 3
    worker_kills: int = 3
    rounds: int | None = None  # None: twice the most events of one kind, plus 6: room for every event
    seed: int = 0
    data: str | None = None  # WikiText directory the workers deal from
    out: str | None = None  # keep store, keys and logs here (default: a temporary directory)
    job: str = "chaos"
    strategy: str = "fedavg"
    clouds: tuple[str, ...] = ("aws", "gcp", "azure")
    local_steps: int = 3
    batch_size: int = 4
    seq_len: int = 64
    codec: str = "topk:0.01+int8"
    job_flags: tuple[str, ...] = ()  # more job flags for the coordinator, e.g. ("--round-deadline", "5")
    max_down_s: float = 2.0  # longest nats-server outage and worker absence
    timeout_s: float = 1800.0
    replay_cli: bool = True  # verify with the ``fedjet replay --verify`` command (False: in this process)

    def __post_init__(self) -> None:
        if min(self.coordinator_kills, self.nats_restarts, self.worker_kills) < 0:
            raise ConfigError("kill and restart counts must be >= 0")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        if len(self.clouds) < 1 or not self.timeout_s > 0 or self.max_down_s < 0:
            raise ConfigError("chaos needs a cloud, --timeout > 0 and --max-down >= 0")
        if self.out is not None and Path(self.out).exists() and any(Path(self.out).iterdir()):
            raise ConfigError(f"--out {self.out}: exists and is not empty")

    @property
    def events(self) -> int:
        return self.coordinator_kills + self.nats_restarts + self.worker_kills

    @property
    def target_rounds(self) -> int:
        return self.rounds if self.rounds is not None else 2 * max(self.counts.values()) + 6

    @property
    def counts(self) -> dict[str, int]:
        return {"coordinator": self.coordinator_kills, "nats": self.nats_restarts, "worker": self.worker_kills}

    @property
    def horizon(self) -> int:
        """The versions over which each kind of event is spread (the job makes a few more)."""
        return max(1, self.target_rounds - 4)


class _Cluster:
    """The processes under test: one nats-server on a fixed port, the coordinator, the workers.
    Every child is started here and stopped here; a child that exits with an error on its own
    is a crash, recorded with its log tail and restarted with the same command."""

    def __init__(self, config: ChaosConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.keys = root / "keys"
        self.store = root / "store"
        self.server: EmbeddedNatsServer | None = None
        self.port = -1
        self.url = ""
        self.coordinator: Child | None = None
        self.workers: dict[str, Child] = {}
        self.started: Counter[str] = Counter()
        self.crashes: list[dict[str, Any]] = []
        self.finished = False  # the coordinator exited 0 (or said the job has finished)
        self.absent: set[str] = set()  # workers killed on purpose, not restarted yet
        self.coordinator_spawned = 0.0

    def start_nats(self) -> None:
        """Start (again) on the same store and port: clients reconnect to the same URL."""
        for attempt in range(20):
            self.server = EmbeddedNatsServer(self.store, port=self.port)
            try:
                url = self.server.start()
                break
            except BrokerError:
                if attempt == 19:
                    raise
                time.sleep(0.25)  # the old listener is still going away
        self.url, self.port = url, urlsplit(url).port or self.port

    def stop_nats(self) -> None:
        if self.server is not None:
            with (self.logs / "nats.log").open("a") as log:
                log.write(self.server.log_tail(400) + "\n--- stopped ---\n")
            self.server.stop()
            self.server = None

    def coordinator_args(self) -> list[str]:
        c = self.config
        args = ["coordinator", "--nats", self.url, "--keys", str(self.keys), "--job", c.job]
        args += ["--clouds", ",".join(c.clouds), "--observers", "eval", "--model", "tiny", "--seed", str(c.seed)]
        args += ["--rounds", str(c.target_rounds), "--strategy", c.strategy, "--codec", c.codec]
        args += ["--local-steps", str(c.local_steps), "--batch-size", str(c.batch_size), "--seq-len", str(c.seq_len)]
        return [*args, "--state", str(self.root / "state"), *c.job_flags]

    def worker_args(self, cloud: str) -> list[str]:
        args = ["worker", "--nats", self.url, "--job", self.config.job, "--cloud", cloud, "--keys", str(self.keys)]
        return [*args, "--deal", *(["--data", self.config.data] if self.config.data else [])]

    def _spawn(self, name: str, args: list[str]) -> Child:
        self.started[name] += 1
        return spawn(f"{name}-{self.started[name]}", args, self.logs)

    def spawn_coordinator(self) -> None:
        self.coordinator = self._spawn("coordinator", self.coordinator_args())
        self.coordinator_spawned = time.monotonic()

    def spawn_worker(self, cloud: str) -> None:
        self.workers[cloud] = self._spawn(f"worker-{cloud}", self.worker_args(cloud))

    @staticmethod
    def kill(child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait()

    def children(self) -> list[Child]:
        return [c for c in (self.coordinator, *self.workers.values()) if c is not None]

    def check(self) -> None:
        """Record and restart children that died on their own with an error."""
        coord = self.coordinator
        if coord is not None and coord.returncode is not None and not self.finished:
            if coord.returncode == 0 or (coord.returncode == 2 and FINISHED in coord.log_tail(5)):
                self.finished = True
            else:
                self._crashed(coord)
                self.spawn_coordinator()
        for cloud, worker in list(self.workers.items()):
            if cloud not in self.absent and worker.returncode not in (None, 0):
                self._crashed(worker)
                self.spawn_worker(cloud)

    def _crashed(self, child: Child) -> None:
        self.crashes.append({"name": child.name, "returncode": child.returncode, "log_tail": child.log_tail(25)})
        if len(self.crashes) > MAX_CRASHES:
            raise ChaosFailed(f"chaos: {len(self.crashes)} crashes, the last {child.name}:\n{child.log_tail(25)}")

    def settled(self) -> bool:
        return self.finished and all(w.returncode == 0 for w in self.workers.values())

    def stop(self) -> None:
        stop_all(self.children())
        self.stop_nats()


class _Watcher:
    """Follows the newest signed head from outside (its own connection, which reconnects)."""

    def __init__(self, url: str, subjects: JobSubjects, coordinator: PublicIdentity) -> None:
        self.url = url
        self.subjects = subjects
        self.coordinator = coordinator
        self.nc: Any = None
        self.version = -1
        self.final = False
        self.seen_at: list[float] = []  # when each new version was first seen
        self._asked = 0.0

    async def open(self) -> None:
        self.nc = await connect(self.url, "fedjet-chaos-watch")

    async def close(self) -> None:
        if self.nc is not None:
            await close_quietly(self.nc)

    async def poll(self) -> None:
        if time.monotonic() - self._asked < 0.15:  # several waiters share one look
            return
        self._asked = time.monotonic()
        try:
            raw = await self.nc.jetstream().get_last_msg(self.subjects.global_stream, self.subjects.global_head)
            head = GlobalHead.verify(raw.data, self.coordinator)
        except (TimeoutError, OSError, nats.errors.Error, nats.js.errors.Error, FedjetError):
            return  # the server is down, the stream not made yet, or junk: ask again later
        if head.version > self.version:
            self.version = head.version
            self.seen_at.append(time.monotonic())
        self.final = self.final or head.final

    def round_s(self) -> float:
        """Time between versions lately, restarts left out (the lower quartile; 2 s at first)."""
        gaps = sorted(b - a for a, b in zip(self.seen_at[-9:], self.seen_at[-8:], strict=False))
        return gaps[len(gaps) // 4] if gaps else 2.0


@dataclass
class _Run:
    config: ChaosConfig
    cluster: _Cluster
    watcher: _Watcher
    deadline: float
    counts: Counter[str] = field(default_factory=Counter)

    async def until(self, done: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        """Poll the head and the children until ``done()``; crashes are restarted meanwhile."""
        deadline = self.deadline if timeout_s is None else min(self.deadline, time.monotonic() + timeout_s)
        while True:
            await self.watcher.poll()
            self.cluster.check()
            if done():
                return
            if time.monotonic() > deadline:
                raise ChaosFailed(f"chaos: timed out waiting for {what} (at version {self.watcher.version})")
            await asyncio.sleep(0.2)

    async def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        await self.until(lambda: time.monotonic() >= end or self.watcher.final, "a pause")


async def _kill_coordinator(run: _Run, rng: random.Random) -> None:
    cluster = run.cluster
    assert cluster.coordinator is not None
    cluster.kill(cluster.coordinator)
    cluster.spawn_coordinator()  # the same command, at once: a supervisor would do this


async def _restart_nats(run: _Run, rng: random.Random) -> None:
    run.cluster.stop_nats()  # SIGTERM: a clean shutdown, as an operator's restart
    await asyncio.sleep(rng.uniform(0.2, max(0.2, run.config.max_down_s)))
    run.cluster.start_nats()


async def _kill_worker(run: _Run, rng: random.Random) -> None:
    cloud = rng.choice(run.config.clouds)
    run.cluster.absent.add(cloud)
    run.cluster.kill(run.cluster.workers[cloud])
    await asyncio.sleep(rng.uniform(0.0, run.config.max_down_s))
    run.cluster.spawn_worker(cloud)
    run.cluster.absent.discard(cloud)


EVENTS = {"coordinator": _kill_coordinator, "nats": _restart_nats, "worker": _kill_worker}


async def _drive(run: _Run) -> None:
    """Each kind of event in its own task, so kinds overlap (a worker may die while the
    coordinator resumes, the server may go away while a worker starts); then the end."""
    horizon = run.config.horizon
    tasks = [asyncio.ensure_future(_events(run, kind, n, horizon)) for kind, n in run.config.counts.items() if n > 0]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await _finish(run)


async def _finish(run: _Run) -> None:
    """The final version, then every process's clean exit. A coordinator that exits without
    a final version (its idle timeout: something stalled) ends the run at once."""
    cluster, watcher = run.cluster, run.watcher
    await run.until(lambda: watcher.final or cluster.finished, "the final version")
    try:
        await run.until(lambda: watcher.final, "the final version after the coordinator exited", timeout_s=15.0)
    except ChaosFailed as e:
        tail = cluster.coordinator.log_tail(10) if cluster.coordinator is not None else ""
        raise ChaosFailed(f"{e}; the coordinator's last lines:\n{tail}") from e
    await run.until(cluster.settled, "the coordinator and workers to exit", timeout_s=180.0)


async def _events(run: _Run, kind: str, n: int, horizon: int) -> None:
    """``n`` events of one kind spread over the first ``horizon`` versions: the i-th waits for
    version ``(i + 1) * horizon / (n + 1)`` and for one newer than the kind's last event, then a
    random part of a round. A quarter of the coordinator kills after the first skip the wait
    and land while the restarted coordinator is still starting or resuming."""
    rng = random.Random(f"{run.config.seed}:{kind}")  # per kind: the same draws whatever the timing
    last = 0
    for i in range(n):
        if kind == "coordinator" and i > 0 and rng.random() < EARLY_KILLS:
            at = run.cluster.coordinator_spawned + rng.uniform(0.5, 4.0)
            await run.pause(max(0.0, at - time.monotonic()))
        else:
            target = max(last + 1, (i + 1) * horizon // (n + 1))
            await run.until(lambda t=target: run.watcher.version >= t or run.watcher.final, f"version {target}")
            await run.pause(rng.uniform(0.0, 1.2 * run.watcher.round_s()))
        if run.watcher.final or run.cluster.finished:
            return
        await EVENTS[kind](run, rng)
        run.counts[kind] += 1
        last = run.watcher.version


def run(config: ChaosConfig) -> dict[str, Any]:
    """Run the job under chaos and audit it; the dict is what ``describe`` and the CLI print."""
    root = Path(config.out) if config.out else Path(tempfile.mkdtemp(prefix="fedjet-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        result = asyncio.run(_run(config, root))
        ok = True
        return result
    finally:
        if config.out is None and ok:
            shutil.rmtree(root, ignore_errors=True)
        elif config.out is None:
            print(f"chaos: logs kept in {root / 'logs'}", file=sys.stderr)


async def _run(config: ChaosConfig, root: Path) -> dict[str, Any]:
    started = time.monotonic()
    cluster = _Cluster(config, root)
    generate(cluster.keys, [*config.clouds, "eval"])
    subjects = JobSubjects(config.job)
    try:
        cluster.start_nats()
        cluster.spawn_coordinator()
        for cloud in config.clouds:
            cluster.spawn_worker(cloud)
        watcher = _Watcher(cluster.url, subjects, load_public(cluster.keys, COORDINATOR))
        await watcher.open()
        try:
            run_ = _Run(config, cluster, watcher, started + config.timeout_s)
            await _drive(run_)
        finally:
            await watcher.close()
        job_s = time.monotonic() - started
        result = await audit(cluster.url, subjects, str(cluster.keys))
        replay = await asyncio.to_thread(
            verify_by_replay, cluster.url, config.job, str(cluster.keys), cli=config.replay_cli
        )
        result |= {"replay_mismatches": replay["mismatches"], "replay_first_mismatch": replay["first_mismatch"]}
    finally:
        cluster.stop()
    result |= {
        "coordinator_kills": run_.counts["coordinator"],
        "nats_restarts": run_.counts["nats"],
        "worker_kills": run_.counts["worker"],
        "planned": config.counts,  # more than happened: the job finished first (give more --rounds)
        "crashes": cluster.crashes,
        "starts": dict(cluster.started),
        "strategy": config.strategy,
        "rounds": config.target_rounds,
        "seed": config.seed,
        "job_s": round(job_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return result


def verify_by_replay(url: str, job: str, keys: str, *, cli: bool = True) -> dict[str, Any]:
    """``fedjet replay --verify`` as a user runs it, and its JSON line; ``cli`` False calls the
    function behind the command in this process instead (the same result, one start fewer)."""
    if not cli:
        from fedjet.runner.replay import ReplayConfig, verify_recording

        config = ReplayConfig(nats_url=url, job=job, keys=keys, verify=True, progress=False)
        return verify_recording(config).to_dict()
    args = ["replay", "--nats", url, "--job", job, "--keys", keys, "--verify", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "fedjet", *args], capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ChaosFailed(f"replay --verify printed no result (exit {done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


@dataclass
class _Records:
    """Every version record, by version (the first head of a version counts, as in replay)."""

    records: dict[int, VersionRecord] = field(default_factory=dict)
    final: bool = False
    forked: int = 0  # a version announced twice with different weights


async def read_records(js: Any, subjects: JobSubjects, follower: GlobalFollower) -> _Records:
    out, hashes = _Records(), {}
    async for msg in read_range(js, subjects.global_stream, subjects.global_head):
        try:
            head = follower.parse_head(msg.data)
        except FedjetError:
            continue
        out.final = out.final or head.final
        if head.version in hashes:
            out.forked += int(hashes[head.version] != head.hash)
            continue
        hashes[head.version] = head.hash
        out.records[head.version] = follower.record(head)
    return out


@dataclass
class _Sent:
    by_seq: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # stream seq -> (cloud, worker, seq)
    unauthenticated: int = 0
    partial_chunks: int = 0  # chunks of blobs that never completed (a worker killed mid-publish)


async def read_sent(js: Any, subjects: JobSubjects, admission: Admission) -> _Sent:
    """Every update blob in the stream, opened as the coordinator opens it (no anti-replay)."""
    limits = admission.limits
    assembler = BlobAssembler(
        max_blob_bytes=envelope_limit(limits.max_frame_bytes),
        max_pending_bytes=4 * envelope_limit(limits.max_frame_bytes),
        max_blobs_per_subject=1024,
    )
    out = _Sent()
    async for msg in read_range(js, subjects.update_stream, subjects.updates, 1):
        try:
            blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream)
            if blob is None:
                continue
            update = await asyncio.to_thread(admission.open, blob.data, JobSubjects.cloud_of(blob.subject))
        except FedjetError:
            out.unauthenticated += 1
            continue
        h = update.header
        out.by_seq[blob.last_seq] = (h.cloud, h.worker, h.seq)
    out.partial_chunks = len(assembler.pending_seqs)
    return out


async def audit(url: str, subjects: JobSubjects, keys: str) -> dict[str, Any]:
    """Read the recording of a finished job and account for every update sent."""
    nc = await connect(url, "fedjet-chaos-audit")
    try:
        js = nc.jetstream()
        spec, boxes = await coordinator_view(js, subjects, keys)
        follower = GlobalFollower(js, subjects, boxes, Limits())
        recorded = await read_records(js, subjects, follower)
        sent = await read_sent(js, subjects, Admission(spec, boxes, Limits()))
    finally:
        await close_quietly(nc)
    if not recorded.records:
        raise ChaosFailed("the job recorded no versions")
    return account(recorded, sent)


def account(recorded: _Records, sent: _Sent) -> dict[str, Any]:
    """The numbers of the module docstring, from the records and the stream."""
    records = [recorded.records[v] for v in sorted(recorded.records)]
    newest = records[-1]
    applied = Counter((c.cloud, c.worker, c.seq) for r in records for c in r.contributions)
    listed = Counter(d.stream_seq for r in records for d in r.dropped)
    resume_from = newest.progress.resume_from
    open_ = {s: key for s, key in sent.by_seq.items() if key not in applied and s not in listed}
    return {
        "versions": max(recorded.records),
        "final": recorded.final,
        "sent": len(sent.by_seq),
        "applied": sum(applied.values()),
        "applied_total_recorded": newest.progress.applied_total,
        "rejected": dict(sorted(newest.progress.rejected.items())),
        "rejected_total": sum(newest.progress.rejected.values()),
        "rejected_listed_complete": all(len(r.dropped) < LISTED_PER_VERSION for r in records),
        "rejected_recounted": sum(n - 1 for n in listed.values()),
        "lost": sum(1 for s in open_ if s < resume_from),
        "lost_updates": [f"{c}/{w}/{q}@{s}" for s, (c, w, q) in sorted(open_.items()) if s < resume_from][:20],
        "doubled": sum(n - 1 for n in applied.values()),
        "undecided_at_end": sum(1 for s in open_ if s >= resume_from),
        "unauthenticated": sent.unauthenticated,
        "partial_chunks": sent.partial_chunks,
        "forked_versions": recorded.forked,
    }


def describe(result: dict[str, Any]) -> str:
    r = result
    rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none"
    verdict = "OK" if healthy(r) else "FAILED"
    return (
        f"chaos {verdict}: {r['versions']} versions{' (final)' if r['final'] else ''}, "
        f"{r['sent']} updates sent, {r['applied']} applied, {r['rejected_total']} rejected ({rejected}); "
        f"lost {r['lost']}, doubled {r['doubled']}, replay mismatches {r['replay_mismatches']}, "
        f"crashes {len(r['crashes'])}; killed the coordinator {r['coordinator_kills']}x, "
        f"restarted nats {r['nats_restarts']}x, killed workers {r['worker_kills']}x "
        f"(planned {r['planned']['coordinator']}/{r['planned']['nats']}/{r['planned']['worker']}); {r['wall_s']:.0f}s"
    )


def healthy(result: dict[str, Any]) -> bool:
    """Nothing lost, nothing doubled, every version replays, nothing crashed."""
    r = result
    return (
        r["final"]
        and r["lost"] == r["doubled"] == r["replay_mismatches"] == r["rejected_recounted"] == 0
        and r["applied"] == r["applied_total_recorded"]
        and not r["crashes"]
        and r["forked_versions"] == 0
    )


def config_from(args: argparse.Namespace) -> ChaosConfig:
    return ChaosConfig(
        coordinator_kills=args.kills, nats_restarts=args.nats_restarts, worker_kills=args.worker_kills,
        rounds=args.rounds, seed=args.seed, data=args.data, out=args.out, job=args.job, strategy=args.strategy,
        clouds=tuple(c for c in args.clouds.split(",") if c), local_steps=args.local_steps, codec=args.codec,
        batch_size=args.batch_size, seq_len=args.seq_len, job_flags=tuple(shlex.split(args.job_flags)),
        max_down_s=args.max_down, timeout_s=args.timeout, replay_cli=not args.inline_replay,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """JSON on stdout, one line for people on stderr; exit 1 unless the run was healthy."""
    configure_logging(os.environ.get("FEDJET_LOG_LEVEL", "error"))  # this driver's reconnects are expected
    config = config_from(build_parser().parse_args(argv))
    try:
        result = run(config)
    except ChaosFailed as e:
        print(f"chaos FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    print(describe(result), file=sys.stderr)
    return 0 if healthy(result) else 1


if __name__ == "__main__":
    sys.exit(main())
