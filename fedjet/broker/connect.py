"""Connecting to a job's NATS as one identity: credentials, TLS, and the JetStream domain.

The one way every command (coordinator, worker, replay, export, status, up's observer)
connects: bounded reconnects, credentials handed down in the environment, redacted errors, and
for clients of a generated topology their NKEY, the CA, their inbox prefix and, behind a leaf
node, the hub's JetStream domain.

A refusal that retrying cannot fix (the server's certificate does not verify against the CA,
the server rejects our certificate or NKEY) ends the first connection at once: nats-py would
otherwise retry it, and after a failed TLS handshake its first connect can hang for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from fedjet.broker.auth import ClientAuth
from fedjet.broker.socket_bytes import CountingClient
from fedjet.broker.urls import NATS_USERINFO_ENV, redact_url, with_userinfo
from fedjet.errors import BrokerError, ConfigError
from fedjet.log import get_logger

log = get_logger("fedjet.broker")

RECONNECT_WAIT_S = 0.5
RECONNECT_WINDOW_S = 600.0  # services ride out ten minutes of broker outage before giving up
MAX_RECONNECTS = 120  # one-shot commands: about a minute of trying (0 would mean forever)
REFUSALS = (ssl.SSLError, nats.errors.AuthorizationError)  # retrying will not change the answer


def is_refusal(e: BaseException) -> bool:
    """A TLS failure or the server's ``-ERR 'Authorization Violation'`` (a plain nats error in nats-py)."""
    return isinstance(e, REFUSALS) or "authorization violation" in str(e).lower()


def server_list(url_or_urls: str | Sequence[str]) -> list[str]:
    """One URL, a comma-separated list, or a sequence (nats-py wants a list, not a tuple)."""
    items = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    urls = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not urls:
        raise ConfigError("no NATS URL given")
    return urls


async def connect_client(
    url_or_urls: str | Sequence[str],
    name: str,
    auth: ClientAuth | None = None,
    *,
    timeout: float = 10.0,
    reconnects: int = MAX_RECONNECTS,
) -> Client:
    """A connection with bounded reconnects, authenticated and TLS-checked as ``auth`` says.

    nats-py spends the same ``reconnects`` budget on the first connection: a one-shot command
    (``fedjet status``) passes a small one so an unreachable server fails in seconds.
    """
    userinfo = os.environ.get(NATS_USERINFO_ENV)  # credentials handed down, never on a command line
    urls = [with_userinfo(u, userinfo) for u in server_list(url_or_urls)]
    if reconnects < 1:
        raise ConfigError(f"reconnects must be >= 1 (nats-py reads 0 as 'forever'), got {reconnects}")
    refused: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def on_error(e: Exception) -> None:
        log.warning("nats_error", client=name, error=redact_url(f"{type(e).__name__}: {e}"))
        if is_refusal(e) and not refused.done():
            refused.set_result(e)

    async def on_disconnect() -> None:
        log.debug("nats_disconnected", client=name)

    extra: dict[str, Any] = auth.connect_kwargs() if auth is not None else {}
    connecting = asyncio.ensure_future(
        _connect(
            urls,
            name=name,
            connect_timeout=timeout,
            reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=reconnects,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            allow_reconnect=True,
            **extra,
        )
    )
    return await _first_connection(connecting, refused, urls)


async def _connect(urls: list[str], **options: Any) -> Client:
    """What ``nats.connect`` does, with a client that counts its socket bytes."""
    nc = CountingClient()
    await nc.connect(urls, **options)
    return nc


async def _first_connection(
    connecting: asyncio.Future[Client], refused: asyncio.Future[BaseException], urls: list[str]
) -> Client:
    """The connection, or a :class:`BrokerError` as soon as the server refuses us for good."""
    where = ", ".join(redact_url(u) for u in urls)
    either: set[asyncio.Future[Any]] = {connecting, refused}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if connecting.done():
        refused.cancel()
        try:
            return connecting.result()
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise BrokerError(redact_url(f"cannot connect to NATS at {where}: {type(e).__name__}: {e}")) from e
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, OSError, TimeoutError, nats.errors.Error):
        await connecting
    reason = refused.result()
    raise BrokerError(
        redact_url(f"cannot connect to NATS at {where}: refused: {type(reason).__name__}: {reason}")
    ) from reason


async def connect_job(
    url_or_urls: str | Sequence[str],
    name: str,
    auth: ClientAuth | None = None,
    domain: str | None = None,
    *,
    timeout: float = 10.0,
    reconnects: int = MAX_RECONNECTS,
) -> tuple[Client, Any]:
    """``(nc, js)``: the connection and its JetStream context in ``domain`` (None: the local one).

    Behind a leaf node ``domain`` must be the hub's (``topology.jetstream_domain``): a leaf
    serves no JetStream of its own and forwards only the domain-qualified API.
    """
    nc = await connect_client(url_or_urls, name, auth, timeout=timeout, reconnects=reconnects)
    return nc, nc.jetstream(domain=domain)


@dataclass(frozen=True, kw_only=True)
class NatsTarget:
    """Where and as whom a command connects: URL(s), credentials and TLS, JetStream domain.

    Every service takes one, so the same flags (``--nats``, ``--nkey``/``--creds``,
    ``--tls-ca``, ``--js-domain``) mean the same everywhere.
    """

    url: str
    auth: ClientAuth | None = None
    domain: str | None = None
    reconnect_window_s: float = RECONNECT_WINDOW_S

    def __post_init__(self) -> None:
        server_list(self.url)
        check_reconnect_window(self.reconnect_window_s)

    @property
    def reconnects(self) -> int:
        """Attempts that fill the window (each waits ``RECONNECT_WAIT_S`` after a failure)."""
        return max(1, math.ceil(self.reconnect_window_s / RECONNECT_WAIT_S))


def check_reconnect_window(seconds: float) -> float:
    """A window in seconds: finite and positive (nats-py has no 'forever' we would want)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"the reconnect window must be a positive number of seconds, got {seconds!r:.20}")
    return seconds


async def open_target(
    target: NatsTarget, name: str, *, timeout: float = 10.0, reconnects: int | None = None
) -> tuple[Client, Any]:
    """``(nc, js)`` for ``target``: a service reconnects for the target's window, a one-shot
    command passes few ``reconnects`` to fail fast."""
    reconnects = target.reconnects if reconnects is None else reconnects
    nc = await connect_client(target.url, name, target.auth, timeout=timeout, reconnects=reconnects)
    return nc, nc.jetstream(domain=target.domain) if target.domain else nc.jetstream()


def default_replicas(nc: Client) -> int:
    """3 copies on a cluster of three or more servers, else 1 (a single server holds one)."""
    known = {s.netloc for s in nc.servers}
    return 3 if len(known) >= 3 else 1
