"""Child processes of ``fedjet up``: started in their own session, stopped with SIGTERM then
SIGKILL after a grace period, so Ctrl-C never leaves a process behind, and sent SIGTERM by the
kernel when ``fedjet up`` itself dies (SIGKILL, the OOM killer), so nothing is orphaned.

Children fork from one launcher process that imported torch, transformers and fedjet once
(``multiprocessing``'s fork server with those modules preloaded): a job's coordinator and
workers then start in milliseconds instead of each spending seconds of CPU on the same
imports. The launcher is started fresh by ``fedjet up``, so children get the code on disk now,
and it exits when ``fedjet up`` does, which takes its children with it."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from pathlib import Path

from fedjet.broker.server import die_with_parent
from fedjet.broker.urls import NATS_USERINFO_ENV, split_userinfo

PRELOADED = ("fedjet.cli", "fedjet.coordinator.service", "fedjet.worker.daemon")
"""What the launcher imports once for every child: the heavy imports of both services."""


class LaunchedProcess:
    """A child forked by the launcher, with the part of ``subprocess.Popen``'s interface the
    callers use (``pid``, ``args``, ``poll``, ``wait``): exit codes are a process's own, and a
    child ended by a signal reads ``-signal`` as with ``Popen``."""

    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str]) -> None:
        self._process = process
        self.args = [sys.executable, "-m", "fedjet", *args]
        assert process.pid is not None, "the launcher returned no PID"
        self.pid: int = process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code


@dataclass
class Child:
    name: str
    proc: LaunchedProcess
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
    """Run ``fedjet <args>`` in a child with output to ``log_dir/<name>.log``. NATS credentials
    in ``args`` move to the child's environment, handed over a private socket rather than on a
    command line (visible to every user of the machine); the child gets SIGTERM if this
    process dies, however it dies."""
    log_path = log_dir / f"{name}.log"
    args, secret_env = without_credentials(args)
    return Child(name, launch(args, log_path, env={**(env or {}), **secret_env}, name=name), log_path)


def launch(
    args: list[str],
    stdout: Path,
    stderr: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    name: str = "fedjet",
) -> LaunchedProcess:
    """Run ``fedjet <args>`` in a child of the launcher, as ``python -m fedjet`` would run in
    ``cwd`` with this environment plus ``env``: standard output to the file ``stdout``,
    standard error to ``stderr`` (or with the output)."""
    for path in {stdout, stderr or stdout}:
        path.write_bytes(b"")
    streams = (str(stdout), str(stderr or stdout))
    child_env = {**os.environ, **(env or {})}
    where = str(cwd or Path.cwd())
    process = _launcher().Process(target=_run_child, args=(args, streams, child_env, where), name=name)
    process.start()
    return LaunchedProcess(process, args)


def start_launcher() -> None:
    """Start the launcher now, so its imports overlap with the caller's own."""
    _launcher()
    multiprocessing.forkserver.ensure_running()


def stop_launcher() -> None:
    """Stop the launcher (and the standard library's resource tracker beside it) for a caller
    that outlives its children, such as a bench in a long-lived process; the next
    :func:`spawn` starts a fresh one."""
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def _launcher() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, ForkServerContext)
    context.set_forkserver_preload(list(PRELOADED))
    return context


def _let_the_launcher_exit() -> None:
    """The launcher exits when the write end of its "parent alive" pipe closes; the standard
    library hands every child a copy of that end, which would keep the launcher (and so the
    child, which dies with the launcher) alive after ``fedjet up`` is SIGKILLed."""
    server = multiprocessing.forkserver._forkserver
    alive = server._forkserver_alive_fd  # type: ignore[attr-defined]
    if alive is not None:
        os.close(alive)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]


def _run_child(args: list[str], streams: tuple[str, str], env: dict[str, str], cwd: str) -> None:
    """The child's side: its own session, its own output files, its environment and working
    directory, then the CLI."""
    for fd, path in zip((1, 2), streams, strict=True):
        log = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(log, fd)
        os.close(log)
    os.chdir(cwd)
    os.setsid()  # a session of its own: Ctrl-C on the terminal reaches ``fedjet up`` only
    _let_the_launcher_exit()
    preexec = die_with_parent(parent=os.getppid())
    if preexec is not None:
        preexec()
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["fedjet", *args]
    runpy.run_module("fedjet", run_name="__main__", alter_sys=True)  # what ``python -m fedjet`` runs


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
    """Signal the child's session; a child that has not yet made its own gets the signal alone."""
    with contextlib.suppress(ProcessLookupError):
        try:
            os.killpg(child.proc.pid, sig)
        except ProcessLookupError:
            os.kill(child.proc.pid, sig)
