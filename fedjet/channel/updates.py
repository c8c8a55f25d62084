"""The update channel, both ends: a worker's :class:`UpdateSender` and the coordinator's
:class:`UpdateInbox`.

The inbox reads a durable pull consumer strictly in stream order and reassembles chunked
blobs. It holds each message unacked until the coordinator decides its fate: acked once the
version that includes it is published (or once it is rejected), so a crash never loses an
update. After a restart, everything at or before ``applied_through`` was decided already.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from fedjet.broker.blobs import H_BLOB, Blob, BlobAssembler, PublishedBlob, part_index, publish_blob
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import Boxes, seal_update
from fedjet.errors import BlobError, FedjetError
from fedjet.log import get_logger

log = get_logger("fedjet.channel")


class UpdateSender:
    """Seals a framed update to the coordinator and publishes it on this cloud's subject."""

    def __init__(self, js: Any, subjects: JobSubjects, boxes: Boxes, cloud: str, worker: str, *, max_payload: int):
        self._js = js
        self.subject = subjects.update(cloud)
        self.boxes = boxes
        self.cloud = cloud
        self.worker = worker
        self.max_payload = max_payload

    async def send(self, frame: bytes, seq: int) -> PublishedBlob:
        payload = seal_update(frame, self.boxes)
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


class UpdateInbox:
    def __init__(self, js: Any, subjects: JobSubjects, *, max_blob_bytes: int) -> None:
        self._js = js
        self.subjects = subjects
        self._assembler = BlobAssembler(max_blob_bytes=max_blob_bytes, max_pending_bytes=2 * max_blob_bytes)
        self._held: dict[tuple[str, str], list[Any]] = {}  # (subject, blob id) -> chunks to ack later
        self._sub: Any = None
        self.applied_through = 0  # decided before a restart: ack, never admit again

    async def open(self, resume_from: int) -> None:
        """A fresh durable from where the record says work is undecided: messages a killed
        coordinator held unacked come again now, not after the ack wait."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.subjects.update_stream, self.subjects.coordinator_durable)
        config = api.ConsumerConfig(
            durable_name=self.subjects.coordinator_durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=3600.0,
            max_ack_pending=100_000,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=resume_from,
            filter_subject=self.subjects.updates,
        )
        self._sub = await self._js.pull_subscribe(
            self.subjects.updates, durable=self.subjects.coordinator_durable, config=config
        )

    async def fetch(self, timeout: float) -> list[Any]:
        try:
            return list(await self._sub.fetch(64, timeout=timeout))
        except (TimeoutError, nats.errors.TimeoutError):
            return []

    async def receive(self, msg: Any) -> Arrival | None:
        """Reassemble; None while a blob is incomplete or the message was decided before."""
        seq = msg.metadata.sequence.stream
        arrival = Arrival(JobSubjects.cloud_of(msg.subject), seq)
        key = (msg.subject, (msg.headers or {}).get(H_BLOB, ""))
        decided = seq <= self.applied_through
        if decided and part_index(msg.headers) != 0 and not self._assembler.is_pending(key):
            await self.ack([msg])  # the tail of a blob that was decided before the restart
            return None
        try:
            blob = self._assembler.add(msg.subject, msg.headers, msg.data, seq)
        except FedjetError as e:
            arrival.msgs, arrival.error = [*self._held.pop(key, []), msg], e
            return await self._undecided(arrival, decided)
        if blob is None:
            self._held.setdefault(key, []).append(msg)
            return None
        arrival.msgs, arrival.blob, arrival.seq = [*self._held.pop(key, []), msg], blob, blob.last_seq
        return await self._undecided(arrival, blob.last_seq <= self.applied_through)

    async def _undecided(self, arrival: Arrival, decided: bool) -> Arrival | None:
        if decided:  # applied or rejected (and counted) before the restart
            await self.ack(arrival.msgs)
            return None
        return arrival

    def evicted(self) -> list[Arrival]:
        """Partial blobs pushed out of the reassembly buffer, as rejections to count and ack."""
        out = []
        for key, seqs in self._assembler.evicted:
            error = BlobError(f"partial blob {key[1][:64]} evicted from the reassembly buffer")
            out.append(Arrival("?", seqs[-1] if seqs else 0, self._held.pop(key, []), error=error))
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
