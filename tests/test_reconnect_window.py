"""Services ride out a broker outage for a configurable window (issue 10, class 10).

A real nats-server is stopped and started again on the same port: a client whose window is
longer than the outage is connected again afterwards; one whose window is shorter has given up.
"""

from __future__ import annotations

import asyncio

import pytest

from fedjet.broker.connect import RECONNECT_WINDOW_S, NatsTarget, open_target
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.errors import ConfigError
from tests.conftest import run_fedjet

OUTAGE_S = 3.0


async def _through_outage(tmp_path, window_s: float) -> tuple[bool, bool]:
    """(connected, closed) of a client some seconds after the server came back."""
    server = EmbeddedNatsServer(tmp_path / "js")
    url = server.start()
    port = int(url.rsplit(":", 1)[1])
    again = EmbeddedNatsServer(tmp_path / "js", port=port)
    nc, js = await open_target(NatsTarget(url=url, reconnect_window_s=window_s), "outage")
    try:
        await js.add_stream(name="S", subjects=["s.>"])
        server.stop()
        await asyncio.sleep(OUTAGE_S)
        again.start()
        for _ in range(100):
            if nc.is_connected or nc.is_closed:
                break
            await asyncio.sleep(0.1)
        if nc.is_connected:
            ack = await js.publish("s.after", b"still here")  # the stream survived on disk
            assert ack.seq == 1
        return nc.is_connected, nc.is_closed
    finally:
        await nc.close()
        server.stop()
        again.stop()


def test_a_window_longer_than_the_outage_reconnects(tmp_path):
    connected, closed = asyncio.run(_through_outage(tmp_path, window_s=30.0))
    assert connected and not closed


def test_a_window_shorter_than_the_outage_gives_up(tmp_path):
    connected, closed = asyncio.run(_through_outage(tmp_path, window_s=1.0))
    assert closed and not connected


def test_services_default_to_minutes_not_one_minute():
    target = NatsTarget(url="nats://127.0.0.1:4222")
    assert target.reconnect_window_s == RECONNECT_WINDOW_S >= 300
    assert target.reconnects * 0.5 >= RECONNECT_WINDOW_S
    with pytest.raises(ConfigError, match="reconnect window"):
        NatsTarget(url="nats://127.0.0.1:4222", reconnect_window_s=0)


@pytest.mark.parametrize("command", ["coordinator", "worker"])
def test_a_bad_window_fails_before_anything_starts(command):
    args = ["--nats", "nats://127.0.0.1:1", "--keys", "nowhere", "--reconnect-window", "soon"]
    if command == "worker":
        args += ["--job", "j", "--cloud", "aws"]
    result = run_fedjet(command, *args, timeout=60)
    assert result.returncode == 2
    assert "--reconnect-window" in result.stderr and "positive number of seconds" in result.stderr
