"""Retrying what a healthy cluster answers only sometimes.

Through a node that does not lead a stream, or while a leaf node or a route comes back,
JetStream API requests can time out, find no responders, or get 503 for a moment. Reads
(spec, heads, version chunks, the throwaway reader of a replay) retry those with backoff instead
of crashing a worker or a replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

from fedjet.errors import BrokerError
from fedjet.log import get_logger

T = TypeVar("T")
log = get_logger("fedjet.broker")
TRANSIENT = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
ATTEMPTS = 8
FIRST_WAIT_S = 0.2


async def retrying(
    action: Callable[[], Awaitable[T]], what: str, *, attempts: int = ATTEMPTS, deadline: float | None = None
) -> T:
    """``await action()``, again after 0.2, 0.4, 0.8 ... s while the broker answers transiently;
    no try starts after ``deadline`` (a ``time.monotonic()`` reading) when one is given."""
    wait = FIRST_WAIT_S
    for attempt in range(1, attempts + 1):
        try:
            return await action()
        except (*TRANSIENT, BrokerError) as e:
            if isinstance(e, BrokerError) and not isinstance(e.__cause__, TRANSIENT):
                raise  # a broker error that waiting will not change
            out_of_time = deadline is not None and time.monotonic() + wait > deadline
            if attempt == attempts or out_of_time:
                raise BrokerError(f"{what}: no answer after {attempt} tries: {type(e).__name__}: {e}") from e
            log.warning("broker_retry", what=what, attempt=attempt, error=type(e).__name__)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 5.0)
    raise AssertionError("unreachable")
