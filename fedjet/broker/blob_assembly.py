"""Reassembling chunked blobs in stream order, under per-subject memory bounds."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedjet.broker.chunks import (
    H_BLOB,
    H_PART,
    H_SIZE,
    HEADER_ROOM,
    MAX_CHUNKS_PER_SUBJECT,
    MSG_ID,
    BlobKey,
    chunk_len,
    header_bytes,
    parse_chunk_headers,
)
from fedjet.errors import BlobError, FedjetError


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

    @property
    def pending_blobs(self) -> int:
        return len(self._pending)

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
        chunk = chunk_len(size, count, index)
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
