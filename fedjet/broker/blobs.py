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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors

from fedjet.errors import BlobError, BrokerError

H_BLOB = "Fedjet-Blob"
H_PART = "Fedjet-Part"
H_SIZE = "Fedjet-Size"
MSG_ID = "Nats-Msg-Id"
HEADER_ROOM = 2048  # bytes kept free in each message for headers


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


@dataclass(frozen=True)
class PublishedBlob:
    first_seq: int
    last_seq: int
    chunks: int
    wire_bytes: int
    duplicate: bool


async def publish_blob(
    js: Any,
    subject: str,
    payload: bytes,
    *,
    blob_id: str,
    max_payload: int,
    extra_headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> PublishedBlob:
    """Publish ``payload`` as chunks and wait for every JetStream ack."""
    count = max(1, math.ceil(len(payload) / chunk_size_for(max_payload)))
    step = math.ceil(len(payload) / count)  # even chunks, so a reader derives offsets from i/n
    view = memoryview(payload)
    futures, wire = [], 0
    try:
        for i in range(count):
            headers = {
                MSG_ID: f"{blob_id}:{i}",
                H_BLOB: blob_id,
                H_PART: f"{i}/{count}",
                H_SIZE: str(len(payload)),
            }
            if i == 0 and extra_headers:
                headers |= extra_headers
            chunk = bytes(view[i * step : (i + 1) * step])
            wire += len(chunk) + header_bytes(headers)
            futures.append(await js.publish_async(subject, chunk, headers=headers, wait_stall=timeout))
        acks = await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:
        for fut in futures:
            fut.cancel()
        raise BrokerError(f"publishing {blob_id} to {subject} failed: {type(e).__name__}: {e}") from e
    return PublishedBlob(
        first_seq=acks[0].seq,
        last_seq=acks[-1].seq,
        chunks=count,
        wire_bytes=wire,
        duplicate=all(bool(a.duplicate) for a in acks),
    )


@dataclass
class Blob:
    """A reassembled blob and where its chunks sit in the stream."""

    blob_id: str
    subject: str
    data: bytes
    headers: dict[str, str]
    seqs: list[int]
    wire_bytes: int

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]


@dataclass
class _Pending:
    blob_id: str
    subject: str
    count: int
    size: int
    buffer: bytearray
    headers: dict[str, str]
    received: set[int] = field(default_factory=set)
    seqs: list[int] = field(default_factory=list)
    filled: int = 0
    wire_bytes: int = 0


def part_index(headers: dict[str, str] | None) -> int | None:
    """The chunk index ``i`` of a ``Fedjet-Part: i/n`` header, or None when it is unreadable."""
    try:
        return int((headers or {}).get(H_PART, "").split("/", 1)[0])
    except ValueError:
        return None


def parse_chunk_headers(headers: dict[str, str] | None, max_blob_bytes: int) -> tuple[str, int, int, int]:
    """(blob id, index, count, total size), validated before anything is allocated."""
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
    if count < 1 or not 0 <= index < count or count > max(1, size):
        raise BlobError(f"blob {blob_id[:64]} declares part {index}/{count} of {size} bytes")
    return blob_id, index, count, size


class BlobAssembler:
    """Reassembles chunked blobs in stream order under a memory bound.

    ``add`` returns the completed :class:`Blob` or ``None``; an inconsistent chunk raises
    :class:`BlobError` (the caller counts it and moves on). When partial blobs would exceed
    ``max_pending_bytes`` the oldest partial blob is evicted and reported by ``evicted``.
    Blobs are keyed by (subject, blob id): a publisher on one subject cannot touch another
    subject's blobs by reusing their ids.
    """

    def __init__(self, *, max_blob_bytes: int, max_pending_bytes: int) -> None:
        self.max_blob_bytes = max_blob_bytes
        self.max_pending_bytes = max_pending_bytes
        self._pending: OrderedDict[BlobKey, _Pending] = OrderedDict()
        self._pending_bytes = 0
        self.evicted: list[tuple[BlobKey, list[int]]] = []

    @property
    def pending_seqs(self) -> list[int]:
        return [s for p in self._pending.values() for s in p.seqs]

    def is_pending(self, key: BlobKey) -> bool:
        return key in self._pending

    def add(self, subject: str, headers: dict[str, str] | None, data: bytes, seq: int) -> Blob | None:
        blob_id, index, count, size = parse_chunk_headers(headers, self.max_blob_bytes)
        assert headers is not None
        key = (subject, blob_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._open(key, count, size, headers)
        elif (pending.count, pending.size) != (count, size):
            self._drop(key)
            raise BlobError(f"blob {blob_id[:64]}: chunk disagrees with earlier chunks")
        pending.seqs.append(seq)
        pending.wire_bytes += len(data) + header_bytes(headers)
        if index in pending.received:
            return None  # a re-delivered chunk; the first copy counts
        chunk = _chunk_len(size, count, index)
        if len(data) != chunk:
            self._drop(key)
            raise BlobError(f"blob {blob_id[:64]} part {index}/{count}: {len(data)} bytes, expected {chunk}")
        start = _chunk_start(size, count, index)
        pending.buffer[start : start + chunk] = data
        pending.received.add(index)
        if len(pending.received) < count:
            return None
        self._drop(key)
        return Blob(blob_id, subject, bytes(pending.buffer), pending.headers, pending.seqs, pending.wire_bytes)

    def _open(self, key: BlobKey, count: int, size: int, headers: dict[str, str]) -> _Pending:
        subject, blob_id = key
        while self._pending and self._pending_bytes + size > self.max_pending_bytes:
            oldest = next(iter(self._pending))
            self.evicted.append((oldest, self._pending[oldest].seqs))
            self._drop(oldest)
        if size > self.max_pending_bytes:
            raise BlobError(f"blob {blob_id[:64]} of {size} bytes exceeds the reassembly buffer")
        keep = {k: v for k, v in headers.items() if k not in (H_BLOB, H_PART, H_SIZE, MSG_ID)}
        pending = _Pending(blob_id, subject, count, size, bytearray(size), keep)
        self._pending[key] = pending
        self._pending_bytes += size
        return pending

    def _drop(self, key: BlobKey) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._pending_bytes -= pending.size


def _chunk_start(size: int, count: int, index: int) -> int:
    return index * math.ceil(size / count) if size else 0


def _chunk_len(size: int, count: int, index: int) -> int:
    if size == 0:
        return 0
    step = math.ceil(size / count)
    return max(0, min(size, (index + 1) * step) - index * step)
