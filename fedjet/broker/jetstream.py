"""Connecting, stream definitions, and ordered reads of a stream range."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from fedjet.broker.blobs import H_BLOB, BlobAssembler
from fedjet.broker.connect import connect_client
from fedjet.broker.retry import retrying
from fedjet.broker.subjects import JobSubjects
from fedjet.broker.urls import redact_url
from fedjet.errors import BlobError, BrokerError, ConfigError
from fedjet.log import get_logger

log = get_logger("fedjet.broker")
__all__ = ["close_quietly", "connect", "ensure_job_streams", "read_range", "redact_url"]


async def connect(url: str, name: str, *, timeout: float = 10.0) -> Client:
    """A plain connection (no identity): see :func:`fedjet.broker.connect.connect_client`."""
    return await connect_client(url, name, timeout=timeout)


DUPLICATE_WINDOW_ENV = "FEDJET_DUPLICATE_WINDOW_S"
UNAVAILABLE_RETRIES, UNAVAILABLE_WAIT_S = 60, 0.5  # a recovering stream answers 503 for a while


def duplicate_window_s(default: float) -> float:
    """JetStream's duplicate window for the streams fedjet creates: ``default``, or seconds from
    ``FEDJET_DUPLICATE_WINDOW_S`` (tests shrink it so a short cut outlasts it: exactly-once must
    not rest on it)."""
    text = os.environ.get(DUPLICATE_WINDOW_ENV)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{DUPLICATE_WINDOW_ENV}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{DUPLICATE_WINDOW_ENV} must be > 0 seconds, got {value}")
    return value


async def ensure_job_streams(js: Any, subjects: JobSubjects, *, replicas: int = 1, secure_agg: bool = False) -> None:
    """Create (or update) the job's streams and KV bucket with ``replicas`` copies each (3 on a
    cluster: losing a node loses nothing); safe to call from every process. A secure-aggregation
    job also gets the stream of its protocol messages and round transcripts."""
    common = {
        "num_replicas": replicas,
        "storage": api.StorageType.FILE,
        "retention": api.RetentionPolicy.LIMITS,
        "discard": api.DiscardPolicy.OLD,
        "duplicate_window": duplicate_window_s(300.0),
        "allow_direct": True,
    }
    await _add_or_update(js, api.StreamConfig(name=subjects.update_stream, subjects=[subjects.updates], **common))
    await _add_or_update(
        js,
        api.StreamConfig(name=subjects.global_stream, subjects=[subjects.global_head, subjects.global_data], **common),
    )
    if secure_agg:
        secagg = [f"fedjet.{subjects.job}.sa.>"]
        await _add_or_update(js, api.StreamConfig(name=subjects.secagg_stream, subjects=secagg, **common))
    with contextlib.suppress(nats.js.errors.BadRequestError):  # exists already
        await js.create_key_value(bucket=subjects.kv_bucket, history=1, storage=api.StorageType.FILE, replicas=replicas)


async def _add_or_update(js: Any, config: api.StreamConfig) -> None:
    """Create, or bring an existing stream to ``config``, keeping the sources it was given
    since (the island streams the coordinator added: another process must not drop them)."""
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        if not config.sources:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                config.sources = (await js.stream_info(config.name)).config.sources
        await js.update_stream(config)


async def read_range(
    js: Any,
    stream: str,
    subject: str,
    first_seq: int = 1,
    last_seq: int | None = None,
    *,
    batch: int = 64,
    idle_timeout: float = 5.0,
) -> AsyncIterator[Msg]:
    """Messages of ``subject`` from ``first_seq`` to ``last_seq`` (default: what is there now).

    A throwaway pull consumer with no acks: reading never disturbs live durable consumers.
    With an explicit ``last_seq`` a gap is an error; without one the read ends when nothing is
    pending.
    """
    if last_seq is not None and last_seq < first_seq:
        return
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=first_seq,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=30.0,
        filter_subject=subject,
    )
    # right after a node dies its new leaders take a few seconds: a replay must not fail for that
    sub = await retrying(
        lambda: js.pull_subscribe(subject, durable=None, stream=stream, config=config), f"reader on {stream}"
    )
    unavailable = 0
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=idle_timeout)
            except nats.js.errors.ServiceUnavailableError as e:  # a replicated stream recovering (a node died)
                unavailable += 1
                if unavailable > UNAVAILABLE_RETRIES:
                    raise BrokerError(f"{stream}: JetStream unavailable for {unavailable} reads in a row") from e
                await asyncio.sleep(UNAVAILABLE_WAIT_S)
                continue
            except (TimeoutError, nats.errors.TimeoutError) as e:
                if last_seq is None:
                    return
                raise BrokerError(f"{stream}: messages {first_seq}..{last_seq} not all readable") from e
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if last_seq is not None and seq > last_seq:
                    return
                yield msg
                if seq == last_seq or (last_seq is None and msg.metadata.num_pending == 0):
                    return
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()


async def close_quietly(nc: Client, timeout: float = 5.0) -> None:
    """Drain (flush pending publishes, end subscriptions), falling back to close."""
    if nc is None or nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except (TimeoutError, nats.errors.Error, OSError) as e:
        log.debug("drain_failed", error=f"{type(e).__name__}: {e}")
    if not nc.is_closed:
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()


async def read_blob(
    js: Any, stream: str, subject: str, first_seq: int, last_seq: int, *, blob_id: str, max_bytes: int
) -> bytes:
    """Blob ``blob_id`` stored at ``first_seq..last_seq`` of ``subject``, reassembled; chunks of
    any other blob in that range, or malformed ones, are skipped (whoever signed the blob's
    contents decides whether they are right)."""
    assembler = BlobAssembler(max_blob_bytes=max_bytes, max_pending_bytes=max_bytes)
    async for msg in read_range(js, stream, subject, first_seq, last_seq):
        if (msg.headers or {}).get(H_BLOB) != blob_id:
            continue
        try:
            blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream)
        except BlobError as e:
            log.warning("chunk_skipped", blob=blob_id[:64], detail=str(e)[:200])
            continue
        if blob is not None:
            return blob.data
    raise BlobError(f"no complete blob {blob_id[:64]} at {subject} seqs {first_seq}..{last_seq}")
