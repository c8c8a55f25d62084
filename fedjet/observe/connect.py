"""Connecting to a job's NATS as one identity: credentials, TLS, and the JetStream domain.

``fedjet.broker.jetstream.connect`` takes a URL and a name only; clients of a generated
topology also need their NKEY, the CA, their inbox prefix and, behind a leaf node, the hub's
JetStream domain. This wrapper keeps the same bounded reconnects and error handling and adds
those, so every command (status, worker, coordinator, replay, export) connects the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from fedjet.broker.auth import ClientAuth
from fedjet.errors import BrokerError, ConfigError
from fedjet.log import get_logger

log = get_logger("fedjet.broker")

RECONNECT_WAIT_S = 0.5
MAX_RECONNECTS = 120  # about a minute of trying before the client gives up


def server_list(url_or_urls: str | Sequence[str]) -> list[str]:
    """One URL, a comma-separated list, or a sequence (nats-py wants a list, not a tuple)."""
    items = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    urls = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not urls:
        raise ConfigError("no NATS URL given")
    return urls


async def connect_client(
    url_or_urls: str | Sequence[str], name: str, auth: ClientAuth | None = None, *, timeout: float = 10.0
) -> Client:
    """A connection with bounded reconnects, authenticated and TLS-checked as ``auth`` says."""
    urls = server_list(url_or_urls)

    async def on_error(e: Exception) -> None:
        log.warning("nats_error", client=name, error=f"{type(e).__name__}: {e}")

    async def on_disconnect() -> None:
        log.debug("nats_disconnected", client=name)

    extra: dict[str, Any] = auth.connect_kwargs() if auth is not None else {}
    try:
        return await nats.connect(
            servers=urls,
            name=name,
            connect_timeout=timeout,
            reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=MAX_RECONNECTS,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            allow_reconnect=True,
            **extra,
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot connect to NATS at {', '.join(urls)}: {type(e).__name__}: {e}") from e


async def connect_job(
    url_or_urls: str | Sequence[str],
    name: str,
    auth: ClientAuth | None = None,
    domain: str | None = None,
    *,
    timeout: float = 10.0,
) -> tuple[Client, Any]:
    """``(nc, js)``: the connection and its JetStream context in ``domain`` (None: the local one).

    Behind a leaf node ``domain`` must be the hub's (``topology.jetstream_domain``): a leaf
    serves no JetStream of its own and forwards only the domain-qualified API.
    """
    nc = await connect_client(url_or_urls, name, auth, timeout=timeout)
    return nc, nc.jetstream(domain=domain)
