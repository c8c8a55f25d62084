"""``fedjet bench chaos``, the harness: the processes under test and a watcher of the newest
signed head. The coordinator reads its job from one validated ``job.toml``, as under ``fedjet up``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors

from fedjet.bench.chaos_config import FINISHED, MAX_CRASHES, ChaosConfig, ChaosFailed
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import PublicIdentity
from fedjet.codecs.messages import GlobalHead
from fedjet.config.flags import add_config_flags, config_from_args, to_toml
from fedjet.config.job import JobConfig
from fedjet.errors import BrokerError, FedjetError
from fedjet.runner.processes import Child, spawn, stop_all, stop_launcher


def chaos_job(config: ChaosConfig) -> tuple[JobConfig, list[str]]:
    """The job as one validated tree (what ``job.toml`` holds), and whatever of ``--job-flags``
    is not a job setting, passed on to the coordinator as given."""
    c = config
    flags = ["--job", c.job, "--clouds", ",".join(c.clouds), "--observers", "eval", "--model", "tiny"]
    flags += ["--seed", str(c.seed), "--rounds", str(c.target_rounds), "--strategy", c.strategy, "--codec", c.codec]
    flags += ["--local-steps", str(c.local_steps), "--batch-size", str(c.batch_size), "--seq-len", str(c.seq_len)]
    parser = argparse.ArgumentParser(prog="fedjet bench chaos --job-flags", add_help=False)
    add_config_flags(parser, with_file=False)
    known, rest = parser.parse_known_args([*flags, *c.job_flags])
    return config_from_args(known), rest


class Cluster:
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
        self.job, self.coordinator_flags = chaos_job(config)
        self.job_file = root / "job.toml"  # the coordinator reads the one validated config tree
        self.job_file.write_text(to_toml(self.job))
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
        args = ["coordinator", "--nats", self.url, "--keys", str(self.keys), "--config", str(self.job_file)]
        return [*args, "--state", str(self.root / "state"), *self.coordinator_flags]

    def worker_args(self, cloud: str) -> list[str]:
        args = ["worker", "--nats", self.url, "--job", self.job.job, "--cloud", cloud, "--keys", str(self.keys)]
        args += ["--deal", *(["--data", self.config.data] if self.config.data else [])]
        return [*args, *self.config.worker_flags]

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

    @staticmethod
    def ranks_of(child: Child) -> list[int]:
        """The extra ranks a worker started: its child processes."""
        pids = []
        for task in Path(f"/proc/{child.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in task.read_text().split()]
        return sorted(pids)

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
        stop_launcher()
        self.stop_nats()


class HeadWatcher:
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
