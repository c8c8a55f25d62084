"""Shared fixtures: a real nats-server per test, the shared WikiText copy, tiny models."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedjet.broker.blobs import H_BLOB, H_PART, H_SIZE, MSG_ID
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.codecs.crypto import COORDINATOR, Boxes, Identity
from fedjet.runner.processes import launch

REPO = Path(__file__).resolve().parents[1]


def _find_data() -> Path:
    env = os.environ.get("FEDJET_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "wikitext-2")
    for path in candidates:
        if (path / "wiki.valid.tokens").is_file():
            return path
    raise RuntimeError(
        "tests need WikiText-2 (wiki.valid.tokens, wiki.test.tokens): set FEDJET_DATA=DIR "
        "or place it at ../shared/data/wikitext-2 next to the repository"
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _find_data()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A fresh JetStream server on a random loopback port; stopped after the test."""
    server = EmbeddedNatsServer(tmp_path / "js")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    return nats_server.url


def make_parties(clouds: tuple[str, ...], observers: tuple[str, ...] = ()) -> tuple[Boxes, dict[str, Boxes]]:
    """Fresh keys: the coordinator's boxes (every member a peer) and each member's own."""
    ids = {n: Identity.generate(n) for n in (COORDINATOR, *clouds, *observers)}
    coord = Boxes(ids[COORDINATOR], {c: ids[c].public for c in (*clouds, *observers)})
    members = {c: Boxes(ids[c], {COORDINATOR: ids[COORDINATOR].public}) for c in (*clouds, *observers)}
    return coord, members


async def publish_part(js, subject: str, payload: bytes, blob_id: str, index: int, count: int, msg_id: str = ""):
    """One chunk of a blob, cut as ``publish_blob`` cuts it (``msg_id``: a copy that JetStream
    will not deduplicate): what a hostile publisher can put on any subject."""
    step = -(-len(payload) // count)
    headers = {MSG_ID: msg_id or f"{blob_id}:{index}", H_BLOB: blob_id, H_PART: f"{index}/{count}",
               H_SIZE: str(len(payload))}  # fmt: skip
    return await js.publish(subject, payload[index * step : (index + 1) * step], headers=headers)


class FedjetProcess:
    """``fedjet <args>`` in a process of its own, as ``python -m fedjet`` would run in the
    repository with this environment plus ``env``, forked from the launcher that ``fedjet up``
    uses (torch and transformers imported once for the session, not once per process). It
    offers the calls of ``subprocess.Popen`` the tests use; output goes to files (``log``: both
    streams to that one file), read as text."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="fedjet-proc-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)  # its output goes with the object
        self.stdout_path = log or Path(self._dir) / "stdout"
        self.stderr_path = None if log else Path(self._dir) / "stderr"
        self._proc = launch(list(args), self.stdout_path, self.stderr_path, env=env, cwd=REPO)
        self.pid, self.args = self._proc.pid, self._proc.args

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        return "" if self.stderr_path is None else self.stderr_path.read_text(errors="replace")

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the exit (``subprocess.TimeoutExpired`` past ``timeout``: the process runs
        on), then both streams."""
        self.wait(timeout)
        return self.output(), self.errors()


def run_fedjet(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI to its end (see :class:`FedjetProcess`); killed past ``timeout``."""
    proc = FedjetProcess(*args, env=env)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    result = subprocess.CompletedProcess([sys.executable, "-m", "fedjet", *args], code, proc.output(), proc.errors())
    return result


TAG_ENV = "FEDJET_TEST_TAG"


def tagged(tag: str) -> dict[str, str]:
    """Environment that marks a process the test starts, and every process it starts in turn
    (children inherit it), so checks never look at anyone else's processes."""
    return {TAG_ENV: tag}


def processes_tagged(tag: str) -> list[int]:
    """PIDs of live (not zombie) processes that carry ``tag``: only what this test started."""
    marker = f"{TAG_ENV}={tag}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in environ and state != "Z":
            found.append(int(proc.name))
    return found


def wait_until_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """The PIDs among ``pids`` still alive (not zombies) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if _alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _alive(pid)]
    return alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def until(condition, what: str, timeout: float = 60.0, every: float = 0.05) -> None:
    """Wait until ``condition()`` holds; fail saying ``what`` did not happen within ``timeout``."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        await asyncio.sleep(every)


async def until_version(service, version: int, timeout: float = 60.0) -> None:
    """Wait until the coordinator ``service`` has made ``version``."""

    def made() -> bool:
        return service.aggregator is not None and service.aggregator.version >= version

    await until(made, f"the coordinator's version {version}", timeout)


# The small model most coordinator tests fold: two tensors, norm ~31.6.
WEIGHTS = {"w": torch.ones(50, 20), "b": torch.zeros(20)}


def sealed_update(
    boxes: Boxes,
    job: str,
    cloud: str,
    seq: int,
    base: int = 0,
    *,
    value: float = 0.01,
    codec: str = "dense",
    tensors: dict | None = None,
    **header: object,
) -> bytes:
    """An update as a cloud seals it: every tensor of ``WEIGHTS`` filled with ``value`` (or
    ``tensors``), a header with 8 samples and loss 2 unless ``header`` says otherwise."""
    from fedjet.codecs import crypto
    from fedjet.codecs.messages import Update, UpdateHeader, encode_update
    from fedjet.config.codec import CodecSpec

    fields = {"samples": 8, "loss": 2.0} | header
    head = UpdateHeader(job=job, cloud=cloud, worker="0", seq=seq, base_version=base, **fields)  # type: ignore[arg-type]
    body = tensors if tensors is not None else {n: torch.full(t.shape, value) for n, t in WEIGHTS.items()}
    return crypto.seal_update(encode_update(Update(head, body), CodecSpec.parse(codec)), boxes)
