"""Bytes at the socket: every byte a NATS client writes to or reads from its connection.

nats-py's own ``stats`` count message payloads only; a run's cost on the wire also has the
protocol around them (subjects, headers, JetStream acknowledgements, flow control, pings, the
re-subscriptions of a reconnect). :class:`CountingClient` counts what passes through its
transport (the plain text of the NATS protocol; TLS adds its record framing on top), across
reconnects, for every connection fedjet opens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client


@dataclass
class SocketBytes:
    """Bytes read from (``received``) and written to (``sent``) one client's connections."""

    received: int = 0
    sent: int = 0

    @property
    def total(self) -> int:
        return self.received + self.sent

    def figures(self) -> dict[str, int]:
        """As a process reports them: ``socket_in`` and ``socket_out``."""
        return {"socket_in": self.received, "socket_out": self.sent}


class CountingClient(Client):
    """A nats-py client whose transport counts the bytes that cross it (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.socket_bytes = SocketBytes()

    async def _select_next_server(self) -> None:
        # Called on the first connection and on every reconnect, once the TCP connection is up
        # and before the protocol handshake: each transport is counted from its first byte.
        await super()._select_next_server()
        _count(self._transport, self.socket_bytes)


def socket_bytes_of(nc: Any) -> SocketBytes:
    """The counters of a connection made by :func:`fedjet.broker.connect.connect_client`."""
    counted = getattr(nc, "socket_bytes", None)
    if not isinstance(counted, SocketBytes):
        raise TypeError(f"{type(nc).__name__} counts no socket bytes: connect with fedjet.broker.connect")
    return counted


def _count(transport: Any, counted: SocketBytes) -> None:
    """Wrap ``transport``'s reads and writes (once: nats-py reuses a live transport)."""
    if transport is None or getattr(transport, "_fedjet_counted", False):
        return
    write, writelines = transport.write, transport.writelines
    read, readline = transport.read, transport.readline

    def counted_write(payload: bytes) -> Any:
        counted.sent += len(payload)
        return write(payload)

    def counted_writelines(payloads: list[bytes]) -> Any:
        counted.sent += sum(len(p) for p in payloads)
        return writelines(payloads)

    def reading(inner: Callable[..., Awaitable[bytes]]) -> Callable[..., Awaitable[bytes]]:
        async def counted_read(*args: Any) -> bytes:
            data = await inner(*args)
            counted.received += len(data)
            return data

        return counted_read

    transport.write, transport.writelines = counted_write, counted_writelines
    transport.read, transport.readline = reading(read), reading(readline)
    transport._fedjet_counted = True


class PeakRate:
    """The most bytes a client wrote in any window of ``window_s`` seconds, sampled from its
    counter (:func:`socket_bytes_of`) by :meth:`run` until cancelled. A window over which the
    event loop was late counts its bytes over its true length: a rate, never more than written."""

    def __init__(self, client: Any, window_s: float = 1.0) -> None:
        self.client = client
        self.window_s = window_s
        self.peak = 0.0

    async def run(self) -> None:
        last_bytes, last_t = socket_bytes_of(self.client).sent, time.monotonic()
        while True:
            await asyncio.sleep(self.window_s)
            now_bytes, now_t = socket_bytes_of(self.client).sent, time.monotonic()
            self.peak = max(self.peak, (now_bytes - last_bytes) / max(now_t - last_t, self.window_s))
            last_bytes, last_t = now_bytes, now_t
