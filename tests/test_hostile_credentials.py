"""Credentials: never printed, logged, written to reports or put on a child's command line (they
travel in its environment), and secret key files that others may read are refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import nats
import pytest

from fedjet.broker import connect as broker_connect
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import JobSubjects
from fedjet.broker.urls import redact_url, split_userinfo, with_userinfo
from fedjet.errors import BrokerError, ConfigError
from fedjet.keystore import generate, load_identity
from fedjet.runner.processes import spawn, stop_all

SECRET = "s3cr3t-Pa55"


def test_urls_are_redacted_wherever_they_are_quoted():
    assert redact_url(f"nats://alice:{SECRET}@hub:4222") == "nats://***@hub:4222"
    assert redact_url("tls://token123@a:1,nats://b:2") == "tls://***@a:1,nats://b:2"
    assert redact_url(f"cannot reach nats://u:{SECRET}@h:1 (refused)") == "cannot reach nats://***@h:1 (refused)"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert split_userinfo(f"nats://alice:{SECRET}@h:1") == ("nats://h:1", f"alice:{SECRET}")
    assert with_userinfo("nats://h:1,nats://g:2", "u:p") == "nats://u:p@h:1,nats://u:p@g:2"
    assert with_userinfo("nats://x:y@h:1", "u:p") == "nats://x:y@h:1"


def test_connect_errors_never_quote_credentials(monkeypatch):
    async def refuse(urls, **kwargs):  # the client's own error names the URL it was given, userinfo and all
        raise OSError(f"connect call to {urls[0]} failed")

    monkeypatch.setattr(broker_connect, "_connect", refuse)  # the one place every connection is made
    with pytest.raises(BrokerError) as caught:
        asyncio.run(connect(f"nats://alice:{SECRET}@127.0.0.1:1", "test"))
    assert SECRET not in str(caught.value) and "***@127.0.0.1:1" in str(caught.value)


@pytest.fixture
def auth_server(tmp_path):
    """A real nats-server (JetStream) that takes only alice's password."""
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f'host: "127.0.0.1"\nport: -1\nauthorization {{ user: alice, password: "{SECRET}" }}\n'
        f"jetstream {{ store_dir: {json.dumps(str(tmp_path / 'js'))} }}\n"
    )
    proc = subprocess.Popen(
        [find_nats_server(), "-c", str(conf), "--ports_file_dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ports = tmp_path / f"nats-server_{proc.pid}.ports"
        deadline = time.monotonic() + 15
        while not ports.is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        yield json.loads(ports.read_text())["nats"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_childs_command_line_carries_no_credentials_yet_it_connects(tmp_path, auth_server):
    keys = tmp_path / "keys"
    generate(keys, ["aws", "eval"])
    url = auth_server.replace("nats://", f"nats://alice:{SECRET}@")
    args = ["coordinator", "--nats", url, "--keys", str(keys), "--job", "creds", "--clouds", "aws", "--rounds", "1"]
    child = spawn("coordinator", args, tmp_path)
    try:
        assert SECRET not in " ".join(child.proc.args)
        cmdline = Path(f"/proc/{child.proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{child.proc.pid}/environ").read_bytes().split(b"\0")
        # handed over the launcher's private socket: on no command line, in no /proc/*/environ
        assert SECRET.encode() not in cmdline and not [v for v in environ if SECRET.encode() in v]
        asyncio.run(wait_for_stream(url, JobSubjects("creds").global_stream, child))
    finally:
        stop_all([child])
    assert SECRET not in child.log_path.read_text(errors="replace")


async def wait_for_stream(url: str, stream: str, child) -> None:
    """The child made the job's streams: it connected with the credentials it was handed."""
    nc = await connect(url, "test")
    try:
        for _ in range(1200):
            assert child.returncode is None, child.log_tail()
            try:
                await nc.jetstream().stream_info(stream)
                return
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
        raise AssertionError(f"the child never connected: {child.log_tail()}")
    finally:
        await close_quietly(nc)


def test_secret_keys_that_others_may_read_are_refused(tmp_path):
    generate(tmp_path, ["aws"])
    assert load_identity(tmp_path, "aws").name == "aws"
    for mode in (0o640, 0o604, 0o660):
        (tmp_path / "aws.key").chmod(mode)
        with pytest.raises(ConfigError, match="chmod 600"):
            load_identity(tmp_path, "aws")
