"""Publishing a blob larger than the server's ``max_payload``: its chunks go out with a bounded
window of async publishes rather than one round trip each, and a re-sent chunk is dropped by
JetStream dedup (its ``Nats-Msg-Id``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import nats.errors
import nats.js.errors

from fedjet.broker.chunks import H_BLOB, H_PART, H_SIZE, MSG_ID, chunk_size_for, header_bytes
from fedjet.errors import BlobError, BrokerError
from fedjet.log import get_logger

log = get_logger("fedjet.broker")

PUBLISH_WINDOW_BYTES = 16 << 20  # unacked bytes one blob keeps in flight (see _publish_chunks)
PUBLISH_ATTEMPTS = 8  # backoff 0.2, 0.4 ... 5 s between them: a restarted server has about 20 s to come back


class LazyPayload(Protocol):
    """A blob whose bytes are made as they are read (an update sealed chunk by chunk);
    reading the same range again must give the same bytes."""

    def __len__(self) -> int: ...

    def read(self, start: int, end: int) -> bytes | bytearray: ...


@dataclass(frozen=True)
class PublishedBlob:
    first_seq: int
    last_seq: int
    chunks: int
    wire_bytes: int
    duplicate: bool
    duplicates: tuple[int, ...] = ()  # chunks JetStream acked as already stored


def _transient(e: BaseException) -> bool:
    """What a restarting server or a recovering stream answers for a while: try again."""
    if isinstance(e, TimeoutError | nats.errors.TimeoutError | nats.errors.NoRespondersError):
        return True
    if isinstance(e, nats.js.errors.NoStreamResponseError | nats.errors.OutboundBufferLimitError):
        return True
    return isinstance(e, nats.js.errors.APIError) and e.code in (429, 503)


async def publish_blob(
    js: Any,
    subject: str,
    payload: bytes | LazyPayload,
    *,
    blob_id: str,
    max_payload: int,
    extra_headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    attempts: int = PUBLISH_ATTEMPTS,
    refuse_duplicate: bool = False,
) -> PublishedBlob:
    """Publish ``payload`` as chunks and wait for every JetStream ack. Transient failures (a
    server restarting, a stream recovering, 429/503, acks lost with a dropped connection)
    re-send the whole blob after a backoff, for up to ``attempts`` tries started within
    ``2 * timeout`` seconds: the chunks' dedup ids make JetStream store each chunk once, and
    acks of re-sent chunks carry the sequence of the copy stored first.

    With ``refuse_duplicate`` (blobs a record will point at, under ids meant to be fresh), a
    chunk JetStream answers as a duplicate that this call had not sent before was stored by
    someone else under the same id (nothing of ours was stored): that is a ``BlobError``, never
    a success, or the record would point at what another party published. Without it, a
    re-published blob reports ``duplicate`` (JetStream dedup, for callers that re-send on purpose)."""
    wait, started = 0.2, time.monotonic()
    sent: set[int] = set()  # chunks published by an earlier try of this call
    for attempt in range(1, attempts + 1):
        try:
            published = await _publish_chunks(js, subject, payload, blob_id, max_payload, extra_headers, timeout, sent)
            taken = [i for i in published.duplicates if i not in sent]
            if refuse_duplicate and taken:
                raise BlobError(
                    f"blob {blob_id[:64]} on {subject}: chunk(s) {taken[:4]} were already stored under the same id "
                    "by someone else (a duplicate ack): nothing of this blob is where the acks point"
                )
            return published
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:
            late = time.monotonic() + wait - started > 2 * timeout
            if not _transient(e) or attempt == attempts or late:
                raise BrokerError(f"publishing {blob_id} to {subject} failed: {type(e).__name__}: {e}") from e
            log.warning("publish_retry", blob=blob_id[:64], attempt=attempt, error=type(e).__name__)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 5.0)
    raise AssertionError("unreachable")


async def _publish_chunks(
    js: Any,
    subject: str,
    payload: bytes | LazyPayload,
    blob_id: str,
    max_payload: int,
    extra_headers: dict[str, str] | None,
    timeout: float,
    sent: set[int],
) -> PublishedBlob:
    """Chunks go out as async publishes, at most ``PUBLISH_WINDOW_BYTES`` unacked at a time:
    JetStream answers 429 "too many requests" once a stream's ingest queue is full, which a few
    publishers of a 340 MB update each did with every chunk in flight at once."""
    count = max(1, math.ceil(len(payload) / chunk_size_for(max_payload)))
    step = math.ceil(len(payload) / count)  # even chunks, so a reader derives offsets from i/n
    window = max(1, PUBLISH_WINDOW_BYTES // step)
    if isinstance(payload, bytes | bytearray | memoryview):
        view = memoryview(payload)
        read: Callable[[int, int], bytes | bytearray] = lambda start, end: bytes(view[start:end])  # noqa: E731
    else:
        read = payload.read
    futures: list[Any] = []
    acks: list[Any] = []
    wire = 0
    try:
        for i in range(count):
            if len(futures) - len(acks) >= window:  # wait for the oldest chunk in flight
                acks.append(await asyncio.wait_for(futures[len(acks)], timeout))
            headers = {
                MSG_ID: f"{blob_id}:{i}",
                H_BLOB: blob_id,
                H_PART: f"{i}/{count}",
                H_SIZE: str(len(payload)),
            }
            if i == 0 and extra_headers:
                headers |= extra_headers
            chunk = read(i * step, (i + 1) * step)  # a lazy payload is sealed here, between sends
            wire += len(chunk) + header_bytes(headers)
            futures.append(await js.publish_async(subject, chunk, headers=headers, wait_stall=timeout))
        acks += await asyncio.wait_for(asyncio.gather(*futures[len(acks) :]), timeout)
    except BaseException:
        for fut in futures:
            fut.cancel()
        sent.update(range(len(futures)))
        raise
    return PublishedBlob(
        first_seq=acks[0].seq,
        last_seq=acks[-1].seq,
        chunks=count,
        wire_bytes=wire,
        duplicate=all(bool(a.duplicate) for a in acks),
        duplicates=tuple(i for i, a in enumerate(acks) if a.duplicate),
    )
