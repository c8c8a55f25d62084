"""Child processes of ``fedjet up``: started in their own session, stopped with SIGTERM then
SIGKILL after a grace period, so Ctrl-C never leaves a process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    """Run ``python -m fedjet <args>`` with output to ``log_dir/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedjet", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return Child(name, proc, log_path)


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every live child, wait up to ``grace_s``, then SIGKILL what is left."""
    for child in children:
        if child.proc.poll() is None:
            _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            child.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            _signal(child, signal.SIGKILL)
            child.proc.wait()


def _signal(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, sig)
