"""The job's KV bucket: the signed job spec and each worker's own figures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors

from fedjet.broker.retry import TRANSIENT, retrying
from fedjet.broker.subjects import JobSubjects, kv_put_subject
from fedjet.codecs.crypto import Identity, PublicIdentity
from fedjet.errors import BrokerError
from fedjet.log import get_logger
from fedjet.spec import JobSpec, sign_spec, verify_spec

log = get_logger("fedjet.channel")


async def publish_spec(js: Any, subjects: JobSubjects, spec: JobSpec, coordinator: Identity) -> None:
    kv = await js.key_value(subjects.kv_bucket)
    await kv.put(subjects.spec_key, sign_spec(spec, coordinator))


async def read_spec(
    js: Any, subjects: JobSubjects, coordinator: PublicIdentity, *, deadline: float | None = None
) -> JobSpec | None:
    """The recorded spec, or None when the job has none yet (retries end by ``deadline``)."""

    async def read() -> bytes:
        kv = await js.key_value(subjects.kv_bucket)
        return bytes((await kv.get(subjects.spec_key)).value)

    try:
        return verify_spec(await retrying(read, "reading the job spec", deadline=deadline), coordinator)
    except nats.js.errors.NotFoundError:  # bucket or key not there yet
        return None


async def await_spec(
    js: Any,
    subjects: JobSubjects,
    coordinator: PublicIdentity,
    timeout_s: float,
    check: Callable[[], None] | None = None,
) -> JobSpec:
    """The job spec the coordinator signed, waiting up to ``timeout_s`` for it to appear
    (``check`` runs between attempts, e.g. to notice a crashed coordinator)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        try:
            spec = await read_spec(js, subjects, coordinator, deadline=deadline)
        except BrokerError as e:
            if isinstance(e.__cause__, TRANSIENT):  # nobody answered, not a refusal
                raise BrokerError(
                    f"{e}. No JetStream answered on this server: behind a leaf node, pass --js-domain "
                    "(the hub's JetStream domain, e.g. hub)"
                ) from e
            raise
        if spec is not None:
            return spec
        if time.monotonic() > deadline:
            raise BrokerError(f"no job spec for {subjects.job} within {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


async def put_stats(
    js: Any, subjects: JobSubjects, cloud: str, stats: dict[str, Any], *, domain: str | None = None
) -> None:
    """Best effort: a failure is logged, the worker goes on. Behind a leaf node (``domain``)
    the put goes through the hub's domain-qualified KV subject, the only one a leaf forwards."""
    await _put_figures(js, subjects, subjects.stats_key(cloud), stats, domain=domain, process=cloud)


async def put_coordinator_stats(js: Any, subjects: JobSubjects, stats: dict[str, Any]) -> None:
    """The coordinator's own figures, at its exit (best effort, as a worker's)."""
    await _put_figures(js, subjects, subjects.coordinator_stats_key, stats, domain=None, process="coordinator")


async def read_stats(js: Any, subjects: JobSubjects, clouds: tuple[str, ...]) -> dict[str, Any]:
    """Every cloud's figures; a cloud that reported none fails the read (a report built on a
    missing figure would show 0 bytes and 0 idle for it)."""
    return {cloud: await _read_figures(js, subjects, subjects.stats_key(cloud), cloud) for cloud in clouds}


async def read_coordinator_stats(js: Any, subjects: JobSubjects) -> dict[str, Any]:
    """The coordinator's figures; none reported fails the read."""
    return await _read_figures(js, subjects, subjects.coordinator_stats_key, "the coordinator")


async def _put_figures(
    js: Any, subjects: JobSubjects, key: str, stats: dict[str, Any], *, domain: str | None, process: str
) -> None:
    """Retried like a read while the broker answers transiently (a put is idempotent: the same
    key, the same figures): under load the one put at a process's exit had timed out, and the
    run's report then had no figures for it."""
    body = json.dumps(stats).encode()

    async def put() -> None:
        if domain:
            await js.publish(kv_put_subject(subjects.kv_bucket, key, domain), body)
            return
        kv = await js.key_value(subjects.kv_bucket)
        await kv.put(key, body)

    try:
        await retrying(put, f"{process}'s figures", attempts=5)
    except (BrokerError, nats.errors.Error, nats.js.errors.Error) as e:
        log.warning("stats_not_reported", process=process, error=str(e))


async def _read_figures(js: Any, subjects: JobSubjects, key: str, who: str) -> dict[str, Any]:
    kv = await js.key_value(subjects.kv_bucket)
    try:
        return dict(json.loads((await kv.get(key)).value))
    except nats.js.errors.NotFoundError:
        raise BrokerError(f"{who} reported no figures to {subjects.kv_bucket}: its stats are missing") from None
