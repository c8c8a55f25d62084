"""The update channel, both ends: a worker's :class:`UpdateSender` and the coordinator's
:class:`UpdateInbox`.

The inbox reads a durable pull consumer strictly in stream order and reassembles chunked
blobs; given the coordinator's keys it opens each update as its chunks arrive (AES-GCM
segments), so it never holds an update's ciphertext and plaintext at once, and hands a frame on
only once the sender's signature over it checks with that cloud's ``.pub`` (an update forged
with the coordinator's own key is refused, counted like any other). It holds each
message unacked until the coordinator decides its fate: acked once the version that includes
it is published (or once it is rejected), so a crash never loses an update. After a restart,
everything at or before ``applied_through`` was decided already.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from fedjet.broker.blobs import (
    H_BLOB,
    MAX_CHUNKS_PER_SUBJECT,
    Blob,
    BlobAssembler,
    BlobSink,
    PublishedBlob,
    part_index,
    publish_blob,
)
from fedjet.broker.retry import TRANSIENT
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import MAX_WORKERS_PER_CLOUD, Boxes, SealedUpdate, UpdateOpener
from fedjet.codecs.record import Progress
from fedjet.errors import AuthenticationError, BlobError, FedjetError
from fedjet.log import get_logger

log = get_logger("fedjet.channel")
PENDING_BLOBS_PER_SUBJECT = 2  # x the largest blob: one subject's reassembly budget
FETCH_BATCH = 64
# A quarter of nats-server's default per-client max_pending (64 MiB). Half of it, with a head or
# an ack beside it, got the coordinator disconnected as a slow consumer while it was busy sealing
# a large version; so did two fetches of a half each, on a loaded machine (a fetch that timed out
# on this side is still delivered while the next is asked for). Well under nats-py's 256 MiB.
FETCH_BYTES = 16 << 20
MIN_CHUNK_BYTES = 1 << 16  # chunks of the largest blobs are at least this (servers take 1 MiB by default)


class UpdateSender:
    """Seals a framed update to the coordinator and publishes it on this cloud's subject;
    each chunk is sealed just before it is sent, so sealing overlaps the publishing."""

    def __init__(
        self,
        js: Any,
        subjects: JobSubjects,
        boxes: Boxes,
        cloud: str,
        worker: str,
        *,
        max_payload: int,
        subject: str | None = None,
    ):
        self._js = js
        self.subject = subject if subject is not None else subjects.update(cloud)  # island: the leaf's subject
        self.boxes = boxes
        self.cloud = cloud
        self.worker = worker
        self.max_payload = max_payload

    async def send(self, frame: bytes, seq: int) -> PublishedBlob:
        payload = SealedUpdate(frame, self.boxes)  # sealed chunk by chunk as it is published
        blob_id = f"{self.cloud}/{self.worker}/{seq}/{secrets.token_hex(6)}"
        return await publish_blob(self._js, self.subject, payload, blob_id=blob_id, max_payload=self.max_payload)


@dataclass
class Arrival:
    """What one message completed: a blob to admit, an error to count, or nothing yet."""

    cloud: str
    seq: int
    msgs: list[Any] = field(default_factory=list)
    blob: Blob | None = None
    error: FedjetError | None = None


class OpeningSink:
    """A blob sink that decrypts an update envelope as it arrives; the blob becomes the frame
    once the sender's signature checks (``UpdateOpener.finish``)."""

    def __init__(self, opener: UpdateOpener) -> None:
        self.opener = opener

    def feed(self, data: bytes) -> None:
        self.opener.feed(data)

    def finish(self) -> bytes:
        return self.opener.finish()[1]


class UpdateInbox:
    """The coordinator's end. Only member clouds' subjects are reassembled (anything else is
    refused at once), each within its own budget of ``PENDING_BLOBS_PER_SUBJECT`` x the
    largest blob, so what a subject can hold unacked is bounded and no subject can crowd
    out another. ``clouds`` None takes every subject (tests of the channel alone). With
    ``boxes``, a blob is the opened frame (only the key of the cloud whose subject carried it
    is tried) or an error; without, the raw envelope."""

    def __init__(
        self,
        js: Any,
        subjects: JobSubjects,
        *,
        max_blob_bytes: int,
        clouds: Collection[str] | None = None,
        ttl_s: float = 600.0,
        max_payload: int = 1 << 20,
        boxes: Boxes | None = None,
    ) -> None:
        self._js = js
        self.boxes = boxes
        self.max_blob_bytes = max_blob_bytes
        # One fetch may bring this many messages of up to max_payload bytes each; beyond the
        # subscription's pending-bytes limit nats-py drops them as a slow consumer, and JetStream
        # then waits ack_wait (an hour) before it delivers them again.
        self.fetch_batch = max(1, min(FETCH_BATCH, FETCH_BYTES // max(max_payload, 1)))
        self.subjects = subjects
        self.clouds = None if clouds is None else frozenset(clouds)
        self.max_chunks = max(MAX_CHUNKS_PER_SUBJECT, PENDING_BLOBS_PER_SUBJECT * -(-max_blob_bytes // MIN_CHUNK_BYTES))
        self._assembler = BlobAssembler(
            max_blob_bytes=max_blob_bytes,
            max_pending_bytes=PENDING_BLOBS_PER_SUBJECT * max_blob_bytes,
            max_blobs_per_subject=2 * MAX_WORKERS_PER_CLOUD,
            max_chunks_per_subject=self.max_chunks,
            ttl_s=ttl_s,
            sink=None if boxes is None else self._opening,
        )
        self._held: dict[tuple[str, str], list[Any]] = {}  # (subject, blob id) -> chunks to ack later
        self._sub: Any = None
        self.applied_through = 0  # decided before a restart: ack, never admit again
        self.resumed: Progress | None = None  # the record's progress after a restart
        self.seen_through = 0  # the last stream seq taken in

    def _opening(self, subject: str, blob_id: str) -> BlobSink:
        assert self.boxes is not None
        return OpeningSink(UpdateOpener(self.boxes, self.max_blob_bytes, senders={JobSubjects.cloud_of(subject)}))

    @property
    def max_ack_pending(self) -> int:
        """Above what partial blobs (bounded per subject) and a batch of complete ones can
        hold, so JetStream never stops delivering while the inbox waits."""
        subjects = len(self.clouds) if self.clouds is not None else 8
        return max(100_000, 4 * subjects * self.max_chunks)

    async def open(self, resume_from: int) -> None:
        """A fresh durable from where the record says work is undecided: messages a killed
        coordinator held unacked come again now, not after the ack wait."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.subjects.update_stream, self.subjects.coordinator_durable)
        config = api.ConsumerConfig(
            durable_name=self.subjects.coordinator_durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=3600.0,
            max_ack_pending=self.max_ack_pending,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=resume_from,
            filter_subject=self.subjects.updates,
        )
        self._sub = await self._js.pull_subscribe(
            self.subjects.updates, durable=self.subjects.coordinator_durable, config=config
        )

    async def fetch(self, timeout: float) -> list[Any]:
        try:
            return list(await self._sub.fetch(self.fetch_batch, timeout=timeout))
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except TRANSIENT as e:  # a restarted server answers 503 while JetStream recovers: ask again
            log.warning("fetch_retry", error=type(e).__name__)
            await asyncio.sleep(timeout)
            return []

    async def receive(self, msg: Any, now: float = 0.0) -> Arrival | None:
        """Reassemble; None while a blob is incomplete or the message was decided before. A
        refused chunk comes back alone, as an error to count and ack at once."""
        seq = msg.metadata.sequence.stream
        arrival = Arrival(JobSubjects.cloud_of(msg.subject), seq, [msg])
        key = (msg.subject, (msg.headers or {}).get(H_BLOB, ""))
        self.seen_through = max(self.seen_through, seq)
        if self.resumed is not None and self.resumed.decided(seq) and seq > self.applied_through:
            await self.ack([msg])  # applied or rejected (and counted) after the last applied one
            return None
        decided = seq <= self.applied_through
        if decided and part_index(msg.headers) != 0 and not self._assembler.is_pending(key):
            await self.ack([msg])  # the tail of a blob that was decided before the restart
            return None
        if self.clouds is not None and arrival.cloud not in self.clouds:
            arrival.error = AuthenticationError(f"{msg.subject[:80]} is not a member cloud's subject")
            return await self._undecided(arrival, decided)
        try:
            blob = self._assembler.add(msg.subject, msg.headers, msg.data, seq, now)
        except FedjetError as e:
            arrival.error = e
            return await self._undecided(arrival, decided)
        finally:
            if self.boxes is not None:
                msg.data = b""  # opened (or kept by the assembler): the held message need not keep it
        if blob is None:
            self._held.setdefault(key, []).append(msg)
            return None
        arrival.msgs, arrival.seq = [*self._held.pop(key, []), msg], blob.last_seq
        arrival.blob, arrival.error = (None, blob.error) if blob.error is not None else (blob, None)
        return await self._undecided(arrival, blob.last_seq <= self.applied_through)

    def held(self, subject: str) -> int:
        """Messages of ``subject`` held unacked in partial blobs."""
        return sum(len(msgs) for (held_subject, _), msgs in self._held.items() if held_subject == subject)

    async def _undecided(self, arrival: Arrival, decided: bool) -> Arrival | None:
        if decided:  # applied or rejected (and counted) before the restart
            await self.ack(arrival.msgs)
            return None
        return arrival

    def evicted(self, now: float | None = None) -> list[Arrival]:
        """Partial blobs given up on (over their subject's budget, or expired by ``now``), as
        rejections to count and ack."""
        if now is not None:
            self._assembler.expire(now)
        out = []
        for gone in self._assembler.evicted:
            error = BlobError(f"partial blob {gone.key[1][:64]} dropped: {gone.why}")
            cloud = JobSubjects.cloud_of(gone.key[0])
            out.append(Arrival(cloud, gone.seqs[-1] if gone.seqs else 0, self._held.pop(gone.key, []), error=error))
        self._assembler.evicted.clear()
        return out

    @property
    def pending_seqs(self) -> list[int]:
        return self._assembler.pending_seqs

    async def ack(self, msgs: list[Any]) -> None:
        for msg in msgs:
            try:
                await msg.ack()
            except (nats.errors.Error, nats.js.errors.Error) as e:
                log.warning("ack_failed", error=str(e))

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None


def stream_seqs(msgs: list[Any]) -> list[int]:
    return [m.metadata.sequence.stream for m in msgs]
