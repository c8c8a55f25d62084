"""The global-version channel, both ends: the coordinator's :class:`GlobalPublisher` and the
:class:`GlobalFollower` that workers, the observer, replay and a resuming coordinator share.

A version is two things on the GLOBALS stream: its weights (encrypted, chunked, on
``global.data``) and a small signed head (on ``global``) saying where the weights sit, their
digest, the version key sealed to each member, and the encrypted :class:`VersionRecord`. Heads
link back through ``prev_head_seq``; :meth:`GlobalFollower.previous` is the one walk along
that chain (to a delta's base, or to the versions a resuming coordinator needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from fedjet.broker.blobs import (
    H_BLOB,
    H_SIZE,
    HEADER_ROOM,
    Blob,
    BlobAssembler,
    PublishedBlob,
    header_bytes,
    publish_blob,
)
from fedjet.broker.jetstream import read_range
from fedjet.broker.retry import retrying
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.views import ViewPublisher, ViewReader
from fedjet.codecs.crypto import (
    COORDINATOR,
    STREAMED,
    Boxes,
    StreamedGlobal,
    digest,
    open_global,
    open_secret,
    open_version_key,
    seal_global_streamed,
)
from fedjet.codecs.frame import FramePieces, Limits
from fedjet.codecs.heads import BlobRef
from fedjet.codecs.messages import (
    GlobalHead,
    GlobalHeader,
    GlobalVersion,
    decode_global,
    encode_global,
    peek_global_header,
)
from fedjet.codecs.record import VersionRecord
from fedjet.codecs.tensors import weights_hash
from fedjet.codecs.withheld import disclosed
from fedjet.config.codec import CodecSpec
from fedjet.errors import AuthenticationError, BlobError, BrokerError, FedjetError, ValidationError
from fedjet.log import get_logger
from fedjet.weights import Weights

log = get_logger("fedjet.channel")
HEARTBEAT_S = 2.0  # nats-py's default of 5 s left workers 10-20 s behind after a server restart


@dataclass(frozen=True)
class LatestHead:
    head: GlobalHead
    seq: int  # its stream sequence


class GlobalPublisher:
    """Publishes versions: weights as a lossless delta on the previous version (a full
    snapshot every ``snapshot_every``), then the signed head that makes them count."""

    def __init__(
        self,
        js: Any,
        subjects: JobSubjects,
        boxes: Boxes,
        members: list[str],
        *,
        max_payload: int,
        snapshot_every: int,
        downlink: CodecSpec | None = None,
        view_every: int = 1,
    ) -> None:
        self._js = js
        self.subjects = subjects
        self.boxes = boxes
        self.members = members  # the coordinator is one of them: replay reads every version
        self.max_payload = max_payload
        self.snapshot_every = snapshot_every
        self.last_head: GlobalHead | None = None
        self._last_head_seq = 0
        self._published: Weights | None = None
        # a +down codec: workers get a lossy view (fedjet.channel.views)
        self.views = None if downlink is None else ViewPublisher(
            downlink, subjects.job, view_every=view_every, seal_and_publish=self._seal_and_publish
        )  # fmt: skip

    def resume(self, latest: LatestHead, weights: Weights) -> None:
        """Continue the chain of a version published before a restart."""
        self.last_head, self._last_head_seq, self._published = latest.head, latest.seq, weights

    async def publish(
        self, version: int, hash_: str, weights: Weights, record: VersionRecord, *, final: bool
    ) -> GlobalHead:
        header = GlobalHeader(job=self.subjects.job, version=version, hash=hash_, final=final)
        base = self._delta_base(version)
        base_version = version - 1 if base is not None else -1
        frame, header = await asyncio.to_thread(encode_global, GlobalVersion(header, weights), base, base_version)
        del base  # the previous version's tensors that this one replaced go now, not once it is out
        self._published = weights
        try:
            return await self._send(version, hash_, weights, frame, header, record)
        except BaseException:
            self._published = None  # not announced: whatever is published next is whole, not a delta on it
            raise

    async def _send(
        self, version: int, hash_: str, weights: Weights, frame: FramePieces, header: GlobalHeader,
        record: VersionRecord,
    ) -> GlobalHead:  # fmt: skip
        """Seal and publish the frame, the view where there is one, then the head."""
        sealed = seal_global_streamed(frame, record.to_bytes(), self.boxes, self.members)
        where, blob = await self._publish_sealed(sealed, f"g/{header.version}")
        meta = sealed.meta
        del frame, sealed  # the views of the weights they held
        view = await self.views.publish(version, hash_, weights) if self.views is not None else None
        head = GlobalHead(
            header=header,
            **where.blob_wire(),
            meta=meta,
            prev_head_seq=self._last_head_seq,
            view=view,
        )
        await self._publish_head(head)
        log.info("version_published", version=version, hash=hash_[:12], bytes=blob.wire_bytes, final=header.final)
        return head

    async def _seal_and_publish(self, frame: bytes, meta: bytes, name: str) -> tuple[BlobRef, PublishedBlob]:
        """Encrypt ``frame`` (and ``meta``) to every member and publish it (a view's way)."""
        return await self._publish_sealed(seal_global_streamed(frame, meta, self.boxes, self.members), name)

    async def _publish_sealed(self, sealed: StreamedGlobal, name: str) -> tuple[BlobRef, PublishedBlob]:
        """Publish a version's weights, sealed segment by segment as the chunks go out (no
        sealed copy is held), under a blob id that is fresh after a restart too; where they
        went is the one :class:`BlobRef` that a head and a view both carry."""
        blob_id = f"{self.subjects.job}/{name}/{secrets.token_hex(6)}"
        blob = await publish_blob(
            self._js, self.subjects.global_data, sealed.payload, blob_id=blob_id, max_payload=self.max_payload,
            refuse_duplicate=True,
        )  # fmt: skip
        sha256 = await asyncio.to_thread(sealed.payload.sha256)  # read through already: nothing is sealed again
        where = BlobRef(
            first_seq=blob.first_seq, last_seq=blob.last_seq, size=len(sealed.payload), sha256=sha256,
            blob_id=blob_id, keys=sealed.keys, seal=STREAMED,
        )  # fmt: skip
        return where, blob

    async def publish_final_marker(self) -> None:
        """Stopped early: re-announce the current version as final so workers exit."""
        if self.last_head is not None and not self.last_head.final:
            await self._publish_head(self.last_head.as_final())

    def _delta_base(self, version: int) -> Weights | None:
        """The previous version's weights, unless a full snapshot is due (bounds the chain a
        late joiner walks back)."""
        if self._published is None or version % self.snapshot_every == 0:
            return None
        return self._published

    async def _publish_head(self, head: GlobalHead) -> None:
        """The id has a random part: anyone who may publish on the head subject could otherwise
        take a predictable id first, and JetStream would drop the real head as a duplicate."""
        msg_id = f"{head.job}/h/{head.version}/{int(head.final)}/{secrets.token_hex(8)}"
        try:
            ack = await self._js.publish(
                self.subjects.global_head, head.sign(self.boxes.me), headers={"Nats-Msg-Id": msg_id}
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise BrokerError(f"publishing global head {head.version} failed: {e}") from e
        if ack.duplicate:
            raise BrokerError(f"global head {head.version} was acked as a duplicate: it was not stored")
        self.last_head, self._last_head_seq = head, ack.seq


class GlobalFollower:
    """Keeps the newest announced head (``every=False``) or queues every head (``every=True``).

    Heads that fail to verify are counted (``rejected``) and ignored; older heads are ignored.
    """

    def __init__(
        self, js: Any, subjects: JobSubjects, boxes: Boxes, limits: Limits, *, every: bool = False, views: bool = False
    ) -> None:
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
        self._held: tuple[int, Weights] | None = None  # the last version fetched
        self._local: dict[int, Weights] = {}  # versions this party built itself (version 0)
        self.views = ViewReader(self) if views else None  # a worker: the broadcast view where a version has one

    async def start(self) -> None:
        policy = api.DeliverPolicy.ALL if self.every else api.DeliverPolicy.LAST
        self._sub = await self._js.subscribe(
            self.subjects.global_head,
            cb=self._on_head,
            ordered_consumer=True,
            deliver_policy=policy,
            stream=self.subjects.global_stream,
            idle_heartbeat=HEARTBEAT_S,  # two missed: the consumer is re-made (a restarted server lost it)
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

    async def read_latest(self) -> LatestHead | None:
        """The newest head that verifies, or None for a job with no versions yet. Junk that
        someone without the coordinator's key put on the head subject is skipped."""
        try:
            raw = await retrying(
                lambda: self._js.get_last_msg(self.subjects.global_stream, self.subjects.global_head),
                "reading the newest global head",
            )
        except nats.js.errors.NotFoundError:
            return None
        try:
            return LatestHead(self.parse_head(raw.data), raw.seq)
        except FedjetError as e:
            log.warning("global_head_rejected", reason=e.reason, stream_seq=raw.seq)
        latest = None
        async for signed in self.recorded_heads():
            latest = signed
        return latest

    async def recorded_heads(self) -> AsyncIterator[LatestHead]:
        """Every head on the stream that verifies, in stream order (a final marker repeats its
        version); anything not signed by this job's coordinator is skipped."""
        async for msg in read_range(self._js, self.subjects.global_stream, self.subjects.global_head):
            with contextlib.suppress(FedjetError):
                yield LatestHead(self.parse_head(msg.data), msg.metadata.sequence.stream)

    async def previous(self, head: GlobalHead) -> GlobalHead | None:
        """One step back along the head chain (None at version 0)."""
        if head.prev_head_seq <= 0:
            return None
        msg = await retrying(
            lambda: self._js.get_msg(self.subjects.global_stream, head.prev_head_seq, direct=True),
            f"reading the head before version {head.version}",
        )
        previous = self.parse_head(msg.data)
        if previous.version >= head.version:
            raise AuthenticationError(f"global {head.version}: head chain points forward to {previous.version}")
        return previous

    def hold_local(self, version: int, tensors: Weights) -> None:
        """Weights this party already holds (its own copy of version 0): a head whose signed
        hash they match is not downloaded."""
        self._local[version] = tensors

    async def fetch(self, head: GlobalHead) -> GlobalVersion:
        """Read, check and decode the weights a head points to.

        A delta version is applied on top of its base: the version fetched last when that is
        the base, else the base fetched first (walking back along the head chain to the last
        full snapshot). The result is checked against the signed hash either way. A follower
        with ``views`` gets a version's broadcast view instead, where it has one.
        """
        if self.views is not None and head.view is not None:
            return await self.views.fetch(head)
        return await self.fetch_weights(head)

    def held_local(self, version: int) -> Weights | None:
        return self._local.get(version)

    async def fetch_weights(self, head: GlobalHead) -> GlobalVersion:
        """The version's own weights (never its view), checked against the signed hash."""
        local = self._local.get(head.version)
        if local is not None and weights_hash(local) == head.hash:
            self._held = (head.version, local)
            return GlobalVersion(head.header, local)
        plaintext = await self.read_blob(head, head.version)
        header = peek_global_header(plaintext, self.limits)
        base = None
        if header.delta_from >= 0:
            base = await self._base(head, header.delta_from)
        version = await asyncio.to_thread(decode_global, plaintext, self.limits, base)
        if version.header.version != head.version or weights_hash(version.tensors) != head.hash:
            raise AuthenticationError(f"global {head.version}: decoded weights do not match the head")
        self._held = (head.version, version.tensors)
        return version

    async def _base(self, head: GlobalHead, base_version: int) -> Weights:
        if self._held is not None and self._held[0] == base_version:
            return self._held[1]
        previous = await self.previous(head) if head.delta_from == base_version else None
        if previous is None:
            raise ValidationError(f"global {head.version}: no way back to its base {base_version}")
        if previous.version != base_version:
            raise AuthenticationError(f"global {head.version}: head chain points at {previous.version}")
        return (await self.fetch_weights(previous)).tensors

    async def read_blob(self, ref: BlobRef, version: int) -> bytes:
        """The plaintext of a sealed blob of ``version`` (its weights, or its view's change)."""
        if not 0 <= ref.size <= self.limits.max_frame_bytes:
            raise ValidationError(f"global {version}: size {ref.size} out of range")
        blob = await retrying(lambda: self._collect(ref, version), f"reading global {version}")
        if blob is None or len(blob.data) != ref.size:
            raise ValidationError(f"global {version}: weights incomplete at {ref.first_seq}..{ref.last_seq}")
        if digest(blob.data) != ref.sha256:
            raise AuthenticationError(f"global {version}: weights do not match the signed digest")
        return await asyncio.to_thread(open_global, blob.data, self._sealed_key(ref, version), self.boxes, ref.seal)

    async def _collect(self, ref: BlobRef, version: int) -> Blob | None:
        """The blob's chunks in its sequence range, reassembled (foreign chunks skipped)."""
        # The signed size bounds what unsigned chunk headers may make us allocate.
        chunks = max(1, -(-ref.size // HEADER_ROOM))  # as many as a publisher could have cut
        assembler = BlobAssembler(max_blob_bytes=ref.size, max_pending_bytes=ref.size, max_chunks_per_subject=chunks)
        blob: Blob | None = None
        messages = read_range(
            self._js, self.subjects.global_stream, self.subjects.global_data, ref.first_seq, ref.last_seq
        )
        async with contextlib.aclosing(messages):
            async for msg in messages:
                size = len(msg.data) + header_bytes(msg.headers)
                self.bytes_down += size
                self.wire_bytes[version] = self.wire_bytes.get(version, 0) + size
                headers = msg.headers or {}
                if (ref.blob_id and headers.get(H_BLOB) != ref.blob_id) or headers.get(H_SIZE) != str(ref.size):
                    continue  # a foreign chunk inside the version's range: not ours, skip it
                try:
                    blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream) or blob
                except BlobError as e:  # a forged chunk under our blob id: the signed digest decides
                    log.warning("global_chunk_skipped", version=version, detail=str(e)[:200])
        return blob

    def _sealed_key(self, ref: BlobRef, version: int) -> bytes:
        sealed_key = ref.keys.get(self.boxes.me.name)
        if sealed_key is None:
            raise AuthenticationError(f"global {version} is not sealed to {self.boxes.me.name!r}")
        return sealed_key

    def record(self, head: GlobalHead) -> VersionRecord:
        """The coordinator's record of this version (who contributed, bytes, progress); with the
        coordinator's key also the part withheld from members (losses, the noise key)."""
        record = VersionRecord.from_bytes(
            open_secret(head.meta, open_version_key(self._sealed_key(head, head.version), self.boxes))
        )
        return disclosed(record, self.boxes.me.box) if self.boxes.me.name == COORDINATOR else record
