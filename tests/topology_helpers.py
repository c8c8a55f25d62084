"""The generated topology on real servers, for the tests that start one: free ports, the running
servers (stopped by PID), client sessions, and the job's first streams, bucket and global version."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import api

from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import JobSubjects
from fedjet.deploy import Topology, TopologyConfig, generate

JOB = "j"
CLOUDS = ("aws", "gcp", "azure")
SUBJECTS = JobSubjects(JOB)
KV_STREAM = f"KV_{SUBJECTS.kv_bucket}"
GLOBAL_CHUNKS, CHUNK_BYTES = 16, 900_000


def _free_base_port(count: int, attempts: int = 50) -> int:
    """A base port whose ``count`` successors are all free on loopback right now."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000 - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no run of {count} free loopback ports found")


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass
class Cluster:
    """The running servers of one generated topology, stopped by PID."""

    topology: Topology
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        server = next(s for s in self.topology.servers if s.name == name)
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [find_nats_server(), "-c", str(server.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for server in (s for s in self.topology.servers if s.name in self.procs):  # the ones started
            while True:
                proc = self.procs[server.name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited: {self.log(server.name)[-2000:]}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", _port_of(server.url)), 0.5):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} is not listening: {self.log(server.name)[-2000:]}")
                time.sleep(0.05)


@dataclass
class Session:
    """One client connection and the asynchronous errors the server sent it."""

    nc: Client
    errors: list[str]

    def js(self, topology: Topology) -> Any:
        return self.nc.jetstream(domain=topology.jetstream_domain, timeout=3.0)


@contextlib.asynccontextmanager
async def session(topology: Topology, identity: str) -> AsyncIterator[Session]:
    """``identity`` connected where the topology says it connects (its leaf, or the hub)."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(
        topology.urls_for(identity),
        error_cb=on_error,
        connect_timeout=3,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=50,
        **topology.client_auth(identity).connect_kwargs(),
    )
    try:
        yield Session(nc, errors)
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()


async def _retry(action: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await action()
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not succeed within {timeout}s: {type(e).__name__}: {e}") from e
            await asyncio.sleep(0.25)


async def _set_up_job(topology: Topology) -> None:
    """What the coordinator does first: R3 streams, the KV bucket, the spec, one global version."""
    common = {"storage": api.StorageType.FILE, "allow_direct": True, "num_replicas": topology.replicas}
    async with session(topology, "coordinator") as co:
        js = co.nc.jetstream(timeout=5.0)
        await _retry(js.account_info, 20, "JetStream on the hub")
        await _retry(
            lambda: js.add_stream(api.StreamConfig(name=SUBJECTS.update_stream, subjects=[SUBJECTS.updates], **common)),
            20,
            "creating the updates stream",
        )
        global_subjects = [SUBJECTS.global_head, SUBJECTS.global_data]
        await js.add_stream(api.StreamConfig(name=SUBJECTS.global_stream, subjects=global_subjects, **common))
        kv = await js.create_key_value(
            api.KeyValueConfig(bucket=SUBJECTS.kv_bucket, history=1, replicas=topology.replicas)
        )
        await kv.put("spec", b"the job spec")
        await js.publish(SUBJECTS.global_head, b"global version 1")
        for i in range(GLOBAL_CHUNKS):  # weights: enough bytes that an ordered consumer needs flow control
            await js.publish(SUBJECTS.global_data, bytes([i]) * CHUNK_BYTES)
        assert co.errors == []


async def _wait_leaves(topology: Topology) -> None:
    """A leaf is ready once its cloud reaches the hub's JetStream through it."""
    for cloud in topology.leaf:
        async with session(topology, cloud) as s:
            await _retry(s.js(topology).account_info, 20, f"JetStream through leaf-{cloud}")


@contextlib.contextmanager
def running(config: TopologyConfig, logs: Path, edit: Callable[[Topology], None] | None = None) -> Iterator[Cluster]:
    """Generate ``config``, start every server, and stop them all (by PID) whatever happens."""
    topology = generate(config)
    if edit is not None:
        edit(topology)
    cluster = Cluster(topology=topology, logs=logs)
    try:
        for server in topology.servers:
            cluster.start(server.name)
        cluster.wait_listening()
        yield cluster
    finally:
        pids = [proc.pid for proc in cluster.procs.values()]
        cluster.stop_all()
        for pid in pids:  # nothing of ours is left running
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def _config(out: Path, clouds: tuple[str, ...], **options: Any) -> TopologyConfig:
    hub_size = options.get("hub_size", 3)
    base_port = _free_base_port(3 * hub_size + len(clouds))
    return TopologyConfig(clouds=clouds, job=JOB, out=out / "deploy", base_port=base_port, **options)
