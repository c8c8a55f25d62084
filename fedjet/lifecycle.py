"""One stop contract for every long-running part (coordinator, worker, ``fedjet up``).

A service has ``run()`` (a coroutine) and ``stop()`` (synchronous, safe to call twice, from a
signal handler): ``stop()`` makes it stop taking work; what is in flight may finish within a
grace period; after that the task is cancelled and its ``finally`` blocks run (drain, close,
final stats). SIGTERM and SIGINT (Ctrl-C) take the same path. Stopping is not finishing: a
stopped coordinator publishes no final marker, so the same command resumes the job later.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

DEFAULT_GRACE_S = 5.0


class Service(Protocol):
    def run(self) -> Awaitable[Any]: ...

    def stop(self) -> None: ...


async def serve(service: Service, *, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Run ``service`` until it returns, or until SIGTERM/SIGINT: stop -> grace -> cancel."""
    await run_until_signalled(service.run, service.stop, grace_s=grace_s)


async def run_until_signalled(
    main: Callable[[], Awaitable[Any]], stop: Callable[[], None], *, grace_s: float = DEFAULT_GRACE_S
) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main())
    signalled = asyncio.Event()

    def on_signal() -> None:
        stop()
        signalled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        waiter = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            await asyncio.wait({task}, timeout=grace_s)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
