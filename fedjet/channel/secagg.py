"""The secure-aggregation channel: sealed steps between the coordinator and each member.

Members publish to ``fedjet.<job>.sa.up.<cloud>``, the coordinator to
``fedjet.<job>.sa.down.<cloud>``; both are kept in the job's SECAGG stream, so a recorded run
holds every message. Each step is sealed to its one recipient (its own key domain: it never
opens as an update) and chunked like any blob. What arrives is reassembled within a bounded
budget, opened (the sender is checked against the roster before any key is used), parsed, and
queued; anything malformed, forged or oversized is counted by reason and logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js import api

from fedjet.broker.blobs import BlobAssembler, header_bytes, publish_blob
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import COORDINATOR, ENVELOPE_OVERHEAD, Boxes, open_secagg, seal_secagg
from fedjet.errors import AuthenticationError, FedjetError
from fedjet.log import get_logger
from fedjet.secagg.steps import DOWN, UP, Step

log = get_logger("fedjet.secagg")
HEARTBEAT_S = 5.0
QUEUE_LIMIT = 4096  # steps waiting to be taken; only authenticated ones get this far


def secagg_max_bytes(members: int, masked: int) -> int:
    """The largest step of a round: a masked vector (8 bytes a coordinate), or a list of
    advertisements, shares or confirmations (a few hundred bytes a member), plus headers and sealing."""
    return 8 * masked + 4096 * members + ENVELOPE_OVERHEAD + (64 << 10)


@dataclass(frozen=True)
class Arrived:
    sender: str
    step: Step
    stream_seq: int
    wire_bytes: int


class SecAggLink:
    """One party's end: the coordinator talks to every member, a member to the coordinator."""

    def __init__(
        self,
        js: Any,
        subjects: JobSubjects,
        boxes: Boxes,
        *,
        peers: Collection[str],
        max_bytes: int,
        max_payload: int,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self._js = js
        self.subjects = subjects
        self.boxes = boxes
        self.me = boxes.me.name
        self.is_coordinator = self.me == COORDINATOR
        self.peers = frozenset(peers) if self.is_coordinator else frozenset({COORDINATOR})
        self.max_bytes = max_bytes
        self.max_payload = max_payload
        self.bytes_sent = 0
        self.bytes_received = 0
        self._assembler = BlobAssembler(
            max_blob_bytes=max_bytes, max_pending_bytes=2 * max_bytes, max_blobs_per_subject=8, ttl_s=600.0
        )
        self._queue: asyncio.Queue[Arrived] = asyncio.Queue(QUEUE_LIMIT)
        self._sub: Any = None
        self._on_reject = on_reject

    async def start(self) -> None:
        """The coordinator listens from now on (it opens every round after this); a member
        starts from the last step sent to it, which is the round opened while it was busy."""
        if self.is_coordinator:
            subject, policy = self.subjects.secagg_ups, api.DeliverPolicy.NEW
        else:
            subject, policy = self.subjects.secagg_down(self.me), api.DeliverPolicy.LAST_PER_SUBJECT
        self._sub = await self._js.subscribe(
            subject,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=policy,
            stream=self.subjects.secagg_stream,
            idle_heartbeat=HEARTBEAT_S,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def send(self, to: str, step: Step) -> int:
        """Seal ``step`` to ``to`` and publish it; the bytes it took on the wire."""
        if self.is_coordinator == (to == COORDINATOR):
            raise AuthenticationError(f"{self.me} does not send secure-aggregation steps to {to!r:.40}")
        subject = self.subjects.secagg_down(to) if self.is_coordinator else self.subjects.secagg_up(self.me)
        envelope = seal_secagg(step.to_bytes(), self.boxes, to)
        blob_id = f"{self.me}-{to}-{step.round_id}-{step.kind}-{secrets.token_hex(4)}"
        published = await publish_blob(
            self._js, subject, envelope, blob_id=blob_id, max_payload=self.max_payload, refuse_duplicate=True
        )
        self.bytes_sent += published.wire_bytes
        return published.wire_bytes

    @property
    def waiting(self) -> int:
        """Steps that arrived and were not taken yet."""
        return self._queue.qsize()

    async def receive(self, timeout: float) -> Arrived | None:
        """The next step that arrived, or None after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
        except TimeoutError:
            return None

    async def _on_message(self, msg: Any) -> None:
        self.bytes_received += len(msg.data) + header_bytes(msg.headers)
        try:
            arrived = self._read(msg)
        except FedjetError as e:
            self._reject(e.reason, str(e))
            return
        if arrived is None:
            return
        try:
            self._queue.put_nowait(arrived)
        except asyncio.QueueFull:
            self._reject("QueueFull", f"{arrived.sender}'s {arrived.step.kind} step dropped: the queue is full")

    def _read(self, msg: Any) -> Arrived | None:
        seq = msg.metadata.sequence.stream
        blob = self._assembler.add(msg.subject, msg.headers, msg.data, seq, time.monotonic())
        for gone in self._assembler.evicted:
            self._reject("BlobError", f"partial secure-aggregation message dropped: {gone.why}")
        self._assembler.evicted.clear()
        if blob is None:
            return None
        sender, payload = open_secagg(blob.data, self.boxes, self.max_bytes, senders=self.peers)
        if self.is_coordinator and JobSubjects.cloud_of(msg.subject) != sender:
            raise AuthenticationError(f"{sender}'s step arrived on another cloud's subject")
        step = Step.from_bytes(payload)
        if step.kind not in (UP if self.is_coordinator else DOWN):
            raise AuthenticationError(f"a {step.kind!r:.20} step may not travel this way")
        return Arrived(sender, step, blob.last_seq, blob.wire_bytes)

    def _reject(self, reason: str, detail: str) -> None:
        log.warning("secagg_message_rejected", reason=reason, detail=detail[:300])
        if self._on_reject is not None:
            self._on_reject(reason, detail)
