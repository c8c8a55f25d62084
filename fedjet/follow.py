"""Follow global versions (workers, the observer, replay, a resuming coordinator): heads arrive on one
subject, weights are read by sequence range and rebuilt from lossless deltas where needed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
import torch
from nats.js import api

from fedjet.broker.blobs import BlobAssembler, header_bytes
from fedjet.broker.jetstream import read_range
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import COORDINATOR, Boxes, PublicIdentity, digest, open_global, open_secret, open_version_key
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHead, GlobalVersion, decode_global, decode_meta, peek_global_header
from fedjet.codecs.tensors import weights_hash
from fedjet.errors import AuthenticationError, BrokerError, FedjetError, ValidationError
from fedjet.log import get_logger
from fedjet.spec import JobSpec, verify_spec

log = get_logger("fedjet.follow")


class GlobalFollower:
    """Keeps the newest announced head (``every=False``) or queues every head (``every=True``).

    Heads that fail to verify are counted (``rejected``) and ignored; older heads are ignored.
    """

    def __init__(self, js: Any, subjects: JobSubjects, boxes: Boxes, limits: Limits, *, every: bool = False) -> None:
        self._js = js
        self.boxes = boxes
        self.subjects = subjects
        self.limits = limits
        self.every = every
        self.latest: GlobalHead | None = None
        self.final: GlobalHead | None = None
        self.rejected = 0
        self.bytes_down = 0
        self.wire_bytes: dict[int, int] = {}  # version -> head + weights as they crossed the wire
        self._queue: asyncio.Queue[GlobalHead] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._sub: Any = None
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None  # the last version fetched

    async def start(self) -> None:
        policy = api.DeliverPolicy.ALL if self.every else api.DeliverPolicy.LAST
        self._sub = await self._js.subscribe(
            self.subjects.global_head,
            cb=self._on_head,
            ordered_consumer=True,
            deliver_policy=policy,
            stream=self.subjects.global_stream,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_head(self, msg: Any) -> None:
        self.bytes_down += len(msg.data) + header_bytes(msg.headers)
        try:
            head = self.parse_head(msg.data)
        except FedjetError as e:
            self.rejected += 1
            log.warning("global_head_rejected", reason=e.reason, detail=str(e)[:200])
            return
        newer = self.latest is None or head.version > self.latest.version
        self.wire_bytes[head.version] = len(msg.data) + header_bytes(msg.headers)
        if newer:
            self.latest = head
        if head.final:
            self.final = head
        if self.every and (newer or head.final):
            self._queue.put_nowait(head)  # a final marker may repeat the last version
        self._changed.set()

    def parse_head(self, data: bytes) -> GlobalHead:
        head = GlobalHead.verify(data, self.boxes.public_of(COORDINATOR))
        if head.job != self.subjects.job:
            raise ValidationError(f"head for job {head.job!r:.40}")
        return head

    async def newer_than(self, version: int) -> GlobalHead:
        """Wait for a head newer than ``version``, or the final marker."""
        while True:
            if self.latest is not None and self.latest.version > version:
                return self.latest
            if self.final is not None:
                return self.final
            self._changed.clear()
            await self._changed.wait()

    async def next_head(self) -> GlobalHead:
        """Every head in order (``every=True``)."""
        return await self._queue.get()

    async def fetch(self, head: GlobalHead) -> GlobalVersion:
        """Read, check and decode the weights a head points to.

        A delta version is applied on top of its base: the version fetched last when that is
        the base, else the base fetched first (walking back along ``prev_head_seq`` to the
        last full snapshot). The result is checked against the signed hash either way.
        """
        plaintext = await self._read_plaintext(head)
        header = peek_global_header(plaintext, self.limits)
        base = None
        if header.delta_from >= 0:
            base = await self._base(head, header.delta_from)
        version = await asyncio.to_thread(decode_global, plaintext, self.limits, base)
        if version.header.version != head.version or weights_hash(version.tensors) != head.hash:
            raise AuthenticationError(f"global {head.version}: decoded weights do not match the head")
        self._held = (head.version, version.tensors)
        return version

    async def _base(self, head: GlobalHead, base_version: int) -> dict[str, torch.Tensor]:
        if self._held is not None and self._held[0] == base_version:
            return self._held[1]
        if head.delta_from != base_version or head.prev_head_seq <= 0:
            raise ValidationError(f"global {head.version}: no way back to its base {base_version}")
        msg = await self._js.get_msg(self.subjects.global_stream, head.prev_head_seq, direct=True)
        previous = self.parse_head(msg.data)
        if previous.version != base_version:
            raise AuthenticationError(f"global {head.version}: head chain points at {previous.version}")
        return (await self.fetch(previous)).tensors

    async def _read_plaintext(self, head: GlobalHead) -> bytes:
        if not 0 <= head.size <= self.limits.max_frame_bytes:
            raise ValidationError(f"global {head.version}: size {head.size} out of range")
        # The signed size bounds what unsigned chunk headers may make us allocate.
        assembler = BlobAssembler(max_blob_bytes=head.size, max_pending_bytes=head.size)
        blob = None
        messages = read_range(
            self._js, self.subjects.global_stream, self.subjects.global_data, head.first_seq, head.last_seq
        )
        async with contextlib.aclosing(messages):
            async for msg in messages:
                size = len(msg.data) + header_bytes(msg.headers)
                self.bytes_down += size
                self.wire_bytes[head.version] = self.wire_bytes.get(head.version, 0) + size
                blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream) or blob
        if blob is None or len(blob.data) != head.size:
            raise ValidationError(f"global {head.version}: weights incomplete at {head.first_seq}..{head.last_seq}")
        if digest(blob.data) != head.sha256:
            raise AuthenticationError(f"global {head.version}: weights do not match the signed digest")
        return await asyncio.to_thread(open_global, blob.data, self._sealed_key(head), self.boxes)

    def _sealed_key(self, head: GlobalHead) -> bytes:
        sealed_key = head.keys.get(self.boxes.me.name)
        if sealed_key is None:
            raise AuthenticationError(f"global {head.version} is not sealed to {self.boxes.me.name!r}")
        return sealed_key

    def meta(self, head: GlobalHead) -> dict[str, Any]:
        """The coordinator's record of this version (who contributed, losses, bytes, counters)."""
        return decode_meta(open_secret(head.meta, open_version_key(self._sealed_key(head), self.boxes)))


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
            kv = await js.key_value(subjects.kv_bucket)
            return verify_spec((await kv.get("spec")).value, coordinator)
        except nats.js.errors.NotFoundError:  # bucket or key not there yet
            if time.monotonic() > deadline:
                raise BrokerError(f"no job spec for {subjects.job} within {timeout_s:.0f}s") from None
            await asyncio.sleep(0.2)
