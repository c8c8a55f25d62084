"""Child processes of ``fedjet up``: started in their own session, stopped with SIGTERM then
SIGKILL after a grace period, so Ctrl-C never leaves a process behind, and sent SIGTERM by the
kernel when ``fedjet up`` itself dies (SIGKILL, the OOM killer), so nothing is orphaned."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedjet.broker.server import die_with_parent
from fedjet.broker.urls import NATS_USERINFO_ENV, split_userinfo


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
    """Run ``python -m fedjet <args>`` with output to ``log_dir/<name>.log``. NATS credentials
    in ``args`` move to the child's environment (a command line is visible to every user of
    the machine); the child gets SIGTERM if this process dies, however it dies."""
    log_path = log_dir / f"{name}.log"
    args, secret_env = without_credentials(args)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedjet", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {}), **secret_env},
            preexec_fn=die_with_parent(),  # children never outlive `fedjet up`
        )
    return Child(name, proc, log_path)


def without_credentials(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``args`` with credentials taken out of every URL, and the environment that carries them."""
    out, env = [], {}
    for arg in args:
        bare, userinfo = split_userinfo(arg)
        if userinfo:
            env[NATS_USERINFO_ENV] = userinfo
        out.append(bare)
    return out, env


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
