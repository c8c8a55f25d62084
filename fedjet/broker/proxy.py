"""A small shaping TCP proxy: a narrow, long link in front of the broker.

``fedjet up --link gcp=20mbit/80ms`` puts one in front of NATS for that cloud, so the real NATS
protocol crosses a link of 20 Mbit/s with 80 ms added one-way delay, in each direction.
Bandwidth is a token bucket refilled at the link rate with a burst of one segment; each
segment is delivered after its serialisation time plus the delay, in order. Queues are
bounded, so a fast sender is slowed by TCP back-pressure rather than buffered without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass

from fedjet.errors import ConfigError
from fedjet.log import get_logger

log = get_logger("fedjet.proxy")

SEGMENT = 16 * 1024
QUEUE_SEGMENTS = 256
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_LINK = re.compile(r"(?:(?P<rate>[\d.]+)(?P<unit>bit|kbit|mbit|gbit))?(?:/(?P<delay>[\d.]+)(?P<dunit>ms|s))?")


@dataclass(frozen=True)
class LinkShape:
    rate_bps: float | None  # None: unlimited
    delay_s: float

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """``20mbit/80ms``, ``512kbit``, ``/150ms``."""
        match = _LINK.fullmatch(text.strip().lower())
        if not match or not (match["rate"] or match["delay"]):
            raise ConfigError(f"--link wants RATE[/DELAY] like 20mbit/80ms, got {text!r}")
        rate = float(match["rate"]) * _UNITS[match["unit"]] if match["rate"] else None
        delay = float(match["delay"] or 0) / (1000 if match["dunit"] == "ms" else 1)
        if rate is not None and rate <= 0:
            raise ConfigError(f"link rate must be > 0, got {text!r}")
        return cls(rate, delay)


class _Shaper:
    """One direction of a link: serialisation at ``rate`` then a fixed delay."""

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self._link_free = 0.0

    def delivery_time(self, size: int, now: float) -> float:
        start = max(now, self._link_free)
        serialise = size * 8 / self.shape.rate_bps if self.shape.rate_bps else 0.0
        self._link_free = start + serialise
        return self._link_free + self.shape.delay_s


class ShapingProxy:
    """``await start()`` returns the local port; ``await stop()`` closes every connection."""

    def __init__(self, upstream_host: str, upstream_port: int, shape: LinkShape, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.shape = shape
        self.host = host
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as e:
            log.warning("proxy_upstream_unreachable", upstream=self.upstream, error=str(e))
            client_writer.close()
            return
        pipes = [
            asyncio.ensure_future(self._pipe(client_reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, client_writer)),
        ]
        for pipe in pipes:
            self._tasks.add(pipe)
            pipe.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for writer in (client_writer, up_writer):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shaper = _Shaper(self.shape)
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_SEGMENTS)
        sender = asyncio.ensure_future(self._deliver(queue, writer))
        try:
            while data := await reader.read(SEGMENT):
                await queue.put((shaper.delivery_time(len(data), time.monotonic()), data))
            await queue.put((0.0, b""))  # end of stream
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()

    @staticmethod
    async def _deliver(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
