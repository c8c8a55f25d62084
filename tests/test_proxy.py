"""The shaping proxy never delivers faster or sooner than the link it shapes (lower bounds only:
how close it comes to the configured rate is a timing claim, measured by the benches)."""

from __future__ import annotations

import asyncio
import time

import pytest

from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.proxy import LinkShape, ShapingProxy
from fedjet.errors import ConfigError


def test_link_specs_parse():
    assert LinkShape.parse("20mbit/80ms") == LinkShape(20e6, 0.08)
    assert LinkShape.parse("512kbit") == LinkShape(512e3, 0.0)
    assert LinkShape.parse("/1.5s") == LinkShape(None, 1.5)
    for bad in ("", "fast", "20mb/s", "0mbit"):
        with pytest.raises(ConfigError):
            LinkShape.parse(bad)


async def _sink_server():
    received = asyncio.Queue()

    async def handle(reader, writer):
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            received.put_nowait((time.monotonic(), total))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


def test_proxy_delivers_no_faster_than_the_configured_rate():
    payload = 1_000_000  # 8 Mbit through an 8 Mbit/s link: about one second

    async def scenario():
        server, port, received = await _sink_server()
        proxy = ShapingProxy("127.0.0.1", port, LinkShape.parse("8mbit/50ms"))
        proxy_port = await proxy.start()
        _, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        start = time.monotonic()
        writer.write(b"x" * payload)
        await writer.drain()
        first_at, total = None, 0
        while total < payload:
            at, total = await asyncio.wait_for(received.get(), 10)
            first_at = first_at or at
        writer.close()
        await proxy.stop()
        server.close()
        return first_at - start, at - start

    first, elapsed = asyncio.run(scenario())
    assert first >= 0.045  # nothing arrives before the added delay
    assert elapsed >= 0.8, elapsed  # 8 Mbit cannot cross an 8 Mbit/s link in less than ~1 s


def test_real_nats_protocol_crosses_a_long_link(nats_url):
    host, port = nats_url.removeprefix("nats://").split(":")

    async def scenario():
        proxy = ShapingProxy(host, int(port), LinkShape.parse("50mbit/60ms"))
        proxy_port = await proxy.start()
        nc = await connect(f"nats://127.0.0.1:{proxy_port}", "through-proxy")
        start = time.monotonic()
        await nc.flush()  # one PING/PONG round trip
        rtt = time.monotonic() - start
        sub = await nc.subscribe("echo.test")
        await nc.publish("echo.test", b"y" * 200_000)
        msg = await sub.next_msg(timeout=10)
        await close_quietly(nc)
        await proxy.stop()
        return rtt, len(msg.data)

    rtt, size = asyncio.run(scenario())
    assert rtt >= 0.11  # two one-way delays of 60 ms
    assert size == 200_000
