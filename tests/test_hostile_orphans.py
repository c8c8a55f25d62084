"""Orphans: whatever starts the embedded nats-server or a fedjet child process may die by SIGKILL
(or the OOM killer) without cleaning up; the kernel must then end its children too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from tests.conftest import REPO, processes_tagged, tagged, wait_until_gone

PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fedjet.broker.server import EmbeddedNatsServer
    from fedjet.keystore import generate
    from fedjet.runner.processes import spawn

    work = Path(sys.argv[1])
    url = EmbeddedNatsServer(work / "js").start()
    generate(work / "keys", ["aws", "eval"])
    args = ["coordinator", "--nats", url, "--keys", str(work / "keys"), "--job", "orphans", "--clouds", "aws"]
    coordinator = spawn("coordinator", args, work)
    print("ready", coordinator.proc.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_sigkilled_parent_takes_its_nats_server_and_fedjet_children_with_it(tmp_path):
    tag = f"orphans-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **tagged(tag), "TMPDIR": str(tmp_path)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    children: list[int] = []
    try:
        ready, coordinator = parent.stdout.readline().split()
        assert ready == "ready"
        children = [pid for pid in processes_tagged(tag) if pid != parent.pid]
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert int(coordinator) in children, "the coordinator should be running"
        assert any(b"nats-server" in command.split(b"\0")[0] for command in commands), "so should the nats-server"
        parent.kill()  # SIGKILL: no finally, no atexit, no signal handler runs
        parent.wait(timeout=10)
        assert wait_until_gone(children, timeout=30) == [], "children outlived their SIGKILLed parent"
    finally:
        for pid in wait_until_gone(children, timeout=0):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
