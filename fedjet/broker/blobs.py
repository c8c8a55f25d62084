"""Blobs larger than the server's ``max_payload``: chunked publish and bounded reassembly.

Every blob travels as ``n`` chunk messages on one subject, each with ``Nats-Msg-Id =
<blob>:<i>`` (so a re-sent chunk is dropped by JetStream dedup) and headers naming the blob,
the part ``i/n`` and the total size. Chunks are published with a bounded window of async
publishes rather than one round trip each. A blob is complete at the stream sequence of its
last chunk: that sequence is its place in the total order the coordinator and replay follow.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
import nats.js.errors

from fedjet.errors import BlobError, BrokerError, FedjetError
from fedjet.log import get_logger

log = get_logger("fedjet.broker")

H_BLOB = "Fedjet-Blob"
H_PART = "Fedjet-Part"
H_SIZE = "Fedjet-Size"
MSG_ID = "Nats-Msg-Id"
HEADER_ROOM = 2048  # bytes kept free in each message for headers
MAX_CHUNKS_PER_SUBJECT = 4096  # chunks one subject may hold in partial blobs (4 GiB at 1 MiB each)
PUBLISH_WINDOW_BYTES = 16 << 20  # unacked bytes one blob keeps in flight (see _publish_chunks)
PUBLISH_ATTEMPTS = 8  # backoff 0.2, 0.4 ... 5 s between them: a restarted server has about 20 s to come back


def chunk_size_for(max_payload: int) -> int:
    if max_payload <= HEADER_ROOM * 2:
        raise BrokerError(f"server max_payload {max_payload} is too small for fedjet chunks")
    return max_payload - HEADER_ROOM


BlobKey = tuple[str, str]  # (subject, blob id)


def header_bytes(headers: dict[str, str] | None) -> int:
    """Size of the NATS header block as sent on the wire."""
    if not headers:
        return 0
    return len("NATS/1.0\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + 2


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


class BlobSink(Protocol):
    """Takes a blob's bytes in order as its chunks arrive (an opener decrypting as it goes),
    so the assembler need not keep them; ``finish`` gives what the blob becomes. Both raise a
    :class:`~fedjet.errors.FedjetError` when the bytes are bad."""

    def feed(self, data: bytes) -> None: ...

    def finish(self) -> bytes: ...


SinkFactory = Callable[[str, str], BlobSink]  # (subject, blob id) -> the sink of a new blob


@dataclass
class Blob:
    """A reassembled blob and where its chunks sit in the stream. With a sink, ``data`` is
    what the sink made of the bytes, or ``error`` says why it could not."""

    blob_id: str
    subject: str
    data: bytes
    headers: dict[str, str]
    seqs: list[int]
    wire_bytes: int
    error: FedjetError | None = None

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]


@dataclass
class _Pending:
    blob_id: str
    subject: str
    count: int
    size: int
    headers: dict[str, str]
    touched: float  # when its last chunk came (expiry counts from there)
    parts: dict[int, bytes] = field(default_factory=dict)  # chunks held: nothing is preallocated
    seqs: list[int] = field(default_factory=list)
    wire_bytes: int = 0
    sink: BlobSink | None = None
    fed: int = 0  # chunks 0..fed-1 went to the sink (and are no longer held)
    error: FedjetError | None = None  # what the sink raised: the rest of the blob is only counted

    def has(self, index: int) -> bool:
        return index < self.fed or index in self.parts

    @property
    def received(self) -> int:
        return self.fed + len(self.parts)

    def drain(self) -> None:
        """Hand the sink every chunk that is next in order; after a failure, just drop them."""
        while self.fed in self.parts:
            data = self.parts.pop(self.fed)
            self.fed += 1
            if self.sink is not None:
                try:
                    self.sink.feed(data)
                except FedjetError as e:
                    self.sink, self.error = None, e


@dataclass(frozen=True)
class Evicted:
    """A partial blob given up on: its subject's budget was needed, or it stopped arriving."""

    key: BlobKey
    seqs: list[int]
    why: str


def part_index(headers: dict[str, str] | None) -> int | None:
    """The chunk index ``i`` of a ``Fedjet-Part: i/n`` header, or None when it is unreadable."""
    try:
        return int((headers or {}).get(H_PART, "").split("/", 1)[0])
    except ValueError:
        return None


def parse_chunk_headers(
    headers: dict[str, str] | None, max_blob_bytes: int, min_chunk_bytes: int = 1
) -> tuple[str, int, int, int]:
    """(blob id, index, count, total size), validated before anything is allocated. A blob
    of ``size`` bytes has at most ``ceil(size / min_chunk_bytes)`` chunks (publishers fill
    each chunk to the server's payload size), which bounds the messages it can hold up."""
    if not headers or H_BLOB not in headers or H_PART not in headers or H_SIZE not in headers:
        raise BlobError("message is not a fedjet chunk (missing Fedjet-Blob/Part/Size headers)")
    blob_id = headers[H_BLOB]
    try:
        index_text, count_text = headers[H_PART].split("/", 1)
        index, count, size = int(index_text), int(count_text), int(headers[H_SIZE])
    except ValueError as e:
        raise BlobError(f"bad chunk headers {headers.get(H_PART)!r:.40}/{headers.get(H_SIZE)!r:.40}") from e
    if not 0 < len(blob_id) <= 256:
        raise BlobError("blob id must be 1..256 characters")
    if size < 0 or size > max_blob_bytes:
        raise BlobError(f"blob {blob_id[:64]} declares {size} bytes > limit {max_blob_bytes}")
    if count < 1 or not 0 <= index < count or count > max(1, math.ceil(size / min_chunk_bytes)):
        raise BlobError(f"blob {blob_id[:64]} declares part {index}/{count} of {size} bytes")
    return blob_id, index, count, size


class BlobAssembler:
    """Reassembles chunked blobs in stream order under per-subject memory bounds.

    ``add`` returns the completed :class:`Blob` or ``None``; a chunk that is inconsistent
    (malformed, a duplicate index, the wrong length, disagreeing with earlier chunks) raises
    :class:`BlobError` and is refused alone: the partial blob it claims to belong to is kept.
    Every subject has its own budget: at most ``max_pending_bytes`` declared and
    ``max_blobs_per_subject`` partial blobs; beyond them that subject's oldest partial blob is
    evicted, never another subject's. A partial blob with no new chunk for ``ttl_s`` expires.
    Both are reported by ``evicted``. Chunks are kept as they came and joined on completion,
    so a declared size never allocates anything; with a ``sink`` factory, chunks go to the
    blob's sink as soon as they are next in order and only out-of-order ones are kept. The
    clock is passed in.
    """

    def __init__(
        self,
        *,
        max_blob_bytes: int,
        max_pending_bytes: int,
        max_blobs_per_subject: int = 32,
        max_chunks_per_subject: int = MAX_CHUNKS_PER_SUBJECT,
        min_chunk_bytes: int = HEADER_ROOM,
        ttl_s: float = 600.0,
        sink: SinkFactory | None = None,
    ) -> None:
        self.sink = sink
        self.max_blob_bytes = max_blob_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_blobs_per_subject = max_blobs_per_subject
        self.max_chunks_per_subject = max_chunks_per_subject
        self.min_chunk_bytes = min_chunk_bytes
        self.ttl_s = ttl_s
        self._pending: OrderedDict[BlobKey, _Pending] = OrderedDict()
        self.evicted: list[Evicted] = []

    @property
    def pending_seqs(self) -> list[int]:
        return [s for p in self._pending.values() for s in p.seqs]

    def is_pending(self, key: BlobKey) -> bool:
        return key in self._pending

    def pending_bytes(self, subject: str) -> int:
        return sum(p.size for p in self._pending.values() if p.subject == subject)

    def pending_chunks(self, subject: str) -> int:
        """Chunks taken in for ``subject``'s partial blobs (each one a message held unacked)."""
        return sum(p.received for p in self._pending.values() if p.subject == subject)

    def add(self, subject: str, headers: dict[str, str] | None, data: bytes, seq: int, now: float = 0.0) -> Blob | None:
        blob_id, index, count, size = parse_chunk_headers(headers, self.max_blob_bytes, self.min_chunk_bytes)
        assert headers is not None
        chunk = _chunk_len(size, count, index)
        if len(data) != chunk:
            raise BlobError(f"blob {blob_id[:64]} part {index}/{count}: {len(data)} bytes, expected {chunk}")
        key = (subject, blob_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._open(key, count, size, headers, now)
        elif (pending.count, pending.size) != (count, size):
            raise BlobError(f"blob {blob_id[:64]}: chunk disagrees with earlier chunks")
        elif pending.has(index):
            raise BlobError(f"blob {blob_id[:64]}: part {index}/{count} came twice")
        self._make_room(subject, key, chunks=1)
        pending.parts[index] = data
        pending.seqs.append(seq)
        pending.wire_bytes += len(data) + header_bytes(headers)
        pending.touched = now
        if self.sink is not None:
            pending.drain()
        if pending.received < count:
            return None
        del self._pending[key]
        blob = Blob(blob_id, subject, b"", pending.headers, pending.seqs, pending.wire_bytes, pending.error)
        if self.sink is None:
            blob.data = b"".join(pending.parts[i] for i in range(count))
        elif pending.sink is not None:
            try:
                blob.data = pending.sink.finish()
            except FedjetError as e:
                blob.error = e
        return blob

    def expire(self, now: float) -> None:
        """Give up on partial blobs that received nothing for ``ttl_s``."""
        for key in [k for k, p in self._pending.items() if now - p.touched > self.ttl_s]:
            self._evict(key, f"no chunk for {self.ttl_s:.0f}s")

    def _open(self, key: BlobKey, count: int, size: int, headers: dict[str, str], now: float) -> _Pending:
        subject, blob_id = key
        if size > self.max_pending_bytes:
            raise BlobError(f"blob {blob_id[:64]} of {size} bytes exceeds the reassembly budget")
        if count > self.max_chunks_per_subject:
            raise BlobError(f"blob {blob_id[:64]} of {count} chunks exceeds the reassembly budget")
        self._make_room(subject, key, blobs=1, size=size)
        keep = {k: v for k, v in headers.items() if k not in (H_BLOB, H_PART, H_SIZE, MSG_ID)}
        pending = _Pending(blob_id, subject, count, size, keep, now)
        if self.sink is not None:
            pending.sink = self.sink(subject, blob_id)
        self._pending[key] = pending
        return pending

    def _make_room(self, subject: str, key: BlobKey, *, blobs: int = 0, size: int = 0, chunks: int = 0) -> None:
        """Evict ``subject``'s oldest partial blobs (never ``key``, never another subject's)
        until one more blob, ``size`` declared bytes and ``chunks`` held chunks fit."""
        mine = [k for k in self._pending if k[0] == subject and k != key]  # oldest first
        while mine and (
            len(mine) + blobs + int(key in self._pending) > self.max_blobs_per_subject
            or self.pending_bytes(subject) + size > self.max_pending_bytes
            or self.pending_chunks(subject) + chunks > self.max_chunks_per_subject
        ):
            self._evict(mine.pop(0), "its subject's reassembly budget was needed")

    def _evict(self, key: BlobKey, why: str) -> None:
        pending = self._pending.pop(key)
        self.evicted.append(Evicted(key, pending.seqs, why))


def _chunk_len(size: int, count: int, index: int) -> int:
    if size == 0:
        return 0
    step = math.ceil(size / count)
    return max(0, min(size, (index + 1) * step) - index * step)
