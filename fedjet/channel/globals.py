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
from dataclasses import dataclass, replace
from typing import Any

import nats.errors
import nats.js.errors
import torch
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
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.retry import retrying
from fedjet.codecs.crypto import (
    COORDINATOR,
    Boxes,
    SealedGlobal,
    digest,
    open_global,
    open_secret,
    open_version_key,
    seal_global,
)
from fedjet.codecs.downlink import decode_view, next_view_frame
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import (
    GlobalHead,
    GlobalHeader,
    GlobalVersion,
    ViewRef,
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

log = get_logger("fedjet.channel")
Weights = dict[str, torch.Tensor]
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
        self.downlink = downlink  # a +down codec: workers get a lossy view (fedjet.codecs.downlink)
        self._view: tuple[int, Weights] | None = None  # the broadcast view workers hold, and its version
        self._view_hash = ""
        self._view_changed = 0  # the version whose view last carried a change
        # Versions between changes of the view: an asynchronous job makes a version per update,
        # and a view change per version would cost the readers more than the update did.
        self.view_every = max(1, view_every)

    def resume(self, latest: LatestHead, weights: Weights) -> None:
        """Continue the chain of a version published before a restart."""
        self.last_head, self._last_head_seq, self._published = latest.head, latest.seq, weights

    async def publish(
        self, version: int, hash_: str, weights: Weights, record: VersionRecord, *, final: bool
    ) -> GlobalHead:
        header = GlobalHeader(job=self.subjects.job, version=version, hash=hash_, final=final)
        base = self._delta_base(version)
        payload, header = await asyncio.to_thread(
            encode_global, GlobalVersion(header, weights), base, version - 1 if base is not None else -1
        )
        self._published = weights
        sealed, blob_id, blob = await self._seal_and_publish(payload, record.to_bytes(), f"g/{version}")
        view = await self._publish_view(version, hash_, weights) if self.downlink is not None else None
        head = GlobalHead(
            header=header,
            first_seq=blob.first_seq,
            last_seq=blob.last_seq,
            size=len(sealed.ciphertext),
            sha256=digest(sealed.ciphertext),
            blob_id=blob_id,
            keys=sealed.keys,
            meta=sealed.meta,
            prev_head_seq=self._last_head_seq,
            view=view,
        )
        await self._publish_head(head)
        log.info("version_published", version=version, hash=hash_[:12], bytes=blob.wire_bytes, final=final)
        return head

    async def _publish_view(self, version: int, hash_: str, weights: Weights) -> ViewRef:
        """The workers' copy: ``C(W - B)`` on the view of the last version. The first version
        after a start (or a restart, which does not know what workers hold) is its own view."""
        assert self.downlink is not None
        if self._view is None:
            self._view, self._view_hash, self._view_changed = (version, weights), hash_, version
            return ViewRef(hash=hash_)
        base, view = self._view
        if version - self._view_changed < self.view_every:  # unchanged: nothing to read
            self._view = (version, view)
            return ViewRef(hash=self._view_hash, base=base)
        header = GlobalHeader(job=self.subjects.job, version=version, hash=hash_, delta_from=base)
        frame, new_view, view_hash = await asyncio.to_thread(next_view_frame, weights, view, self.downlink, header)
        sealed, blob_id, blob = await self._seal_and_publish(frame, b"", f"v/{version}")
        self._view, self._view_hash, self._view_changed = (version, new_view), view_hash, version
        log.info("view_published", version=version, base=base, bytes=blob.wire_bytes)
        return ViewRef(
            hash=view_hash,
            base=base,
            first_seq=blob.first_seq,
            last_seq=blob.last_seq,
            size=len(sealed.ciphertext),
            sha256=digest(sealed.ciphertext),
            blob_id=blob_id,
            keys=sealed.keys,
        )

    async def _seal_and_publish(self, frame: bytes, meta: bytes, name: str) -> tuple[SealedGlobal, str, PublishedBlob]:
        """Encrypt ``frame`` (and ``meta``) to every member and publish it as chunks under a
        blob id that is fresh after a restart too."""
        sealed = await asyncio.to_thread(seal_global, frame, meta, self.boxes, self.members)
        blob_id = f"{self.subjects.job}/{name}/{secrets.token_hex(6)}"
        blob = await publish_blob(
            self._js, self.subjects.global_data, sealed.ciphertext, blob_id=blob_id, max_payload=self.max_payload,
            refuse_duplicate=True,
        )  # fmt: skip
        return sealed, blob_id, blob

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
        self.views = views  # a worker: fetch the broadcast view where a version has one
        self._held_view: tuple[int, Weights] | None = None  # the last view fetched

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
        if self.views and head.view is not None:
            return await self._fetch_view(head)
        return await self._fetch_version(head)

    async def _fetch_version(self, head: GlobalHead) -> GlobalVersion:
        local = self._local.get(head.version)
        if local is not None and weights_hash(local) == head.hash:
            self._held = (head.version, local)
            return GlobalVersion(head.header, local)
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

    async def _base(self, head: GlobalHead, base_version: int) -> Weights:
        if self._held is not None and self._held[0] == base_version:
            return self._held[1]
        previous = await self.previous(head) if head.delta_from == base_version else None
        if previous is None:
            raise ValidationError(f"global {head.version}: no way back to its base {base_version}")
        if previous.version != base_version:
            raise AuthenticationError(f"global {head.version}: head chain points at {previous.version}")
        return (await self._fetch_version(previous)).tensors

    async def _fetch_view(self, head: GlobalHead) -> GlobalVersion:
        """The view of ``head``: its change applied to the view of its base, walking back along
        the heads to a view this party holds or one that is a version's own weights."""
        chain = [head]
        weights = self._known_view(head)
        while weights is None and _view(chain[-1]).base >= 0:
            previous = await self.previous(chain[-1])
            if previous is None or previous.view is None or previous.version != _view(chain[-1]).base:
                raise AuthenticationError(f"global {head.version}: no way back to the view it changes")
            chain.append(previous)
            weights = self._known_view(previous)
        if weights is None:  # the view of the oldest one is that version's own weights
            weights = self._checked_view(chain[-1], (await self._fetch_version(chain[-1])).tensors)
        for step in reversed(chain[:-1]):
            ref = _view(step)
            if not ref.blob_id:  # the view did not change at this version
                weights = self._checked_view(step, weights)
                continue
            blob = replace(step, first_seq=ref.first_seq, last_seq=ref.last_seq, size=ref.size,
                           sha256=ref.sha256, blob_id=ref.blob_id, keys=ref.keys)  # fmt: skip
            plaintext = await self._read_plaintext(blob)
            weights = self._checked_view(
                step, (await asyncio.to_thread(decode_view, plaintext, self.limits, weights)).tensors
            )
        self._held_view = (head.version, weights)
        return GlobalVersion(replace(head.header, hash=_view(head).hash), weights)

    def _known_view(self, head: GlobalHead) -> Weights | None:
        if self._held_view is not None and self._held_view[0] == head.version:
            return self._held_view[1]
        local = self._local.get(head.version)
        return local if local is not None and weights_hash(local) == _view(head).hash else None

    @staticmethod
    def _checked_view(head: GlobalHead, weights: Weights) -> Weights:
        if weights_hash(weights) != _view(head).hash:
            raise AuthenticationError(f"global {head.version}: the view does not match the signed view hash")
        return weights

    async def _read_plaintext(self, head: GlobalHead) -> bytes:
        if not 0 <= head.size <= self.limits.max_frame_bytes:
            raise ValidationError(f"global {head.version}: size {head.size} out of range")
        blob = await retrying(lambda: self._collect(head), f"reading global {head.version}")
        if blob is None or len(blob.data) != head.size:
            raise ValidationError(f"global {head.version}: weights incomplete at {head.first_seq}..{head.last_seq}")
        if digest(blob.data) != head.sha256:
            raise AuthenticationError(f"global {head.version}: weights do not match the signed digest")
        return await asyncio.to_thread(open_global, blob.data, self._sealed_key(head), self.boxes)

    async def _collect(self, head: GlobalHead) -> Blob | None:
        """The version's chunks in its sequence range, reassembled (foreign chunks skipped)."""
        # The signed size bounds what unsigned chunk headers may make us allocate.
        chunks = max(1, -(-head.size // HEADER_ROOM))  # as many as a publisher could have cut
        assembler = BlobAssembler(max_blob_bytes=head.size, max_pending_bytes=head.size, max_chunks_per_subject=chunks)
        blob: Blob | None = None
        messages = read_range(
            self._js, self.subjects.global_stream, self.subjects.global_data, head.first_seq, head.last_seq
        )
        async with contextlib.aclosing(messages):
            async for msg in messages:
                size = len(msg.data) + header_bytes(msg.headers)
                self.bytes_down += size
                self.wire_bytes[head.version] = self.wire_bytes.get(head.version, 0) + size
                headers = msg.headers or {}
                if (head.blob_id and headers.get(H_BLOB) != head.blob_id) or headers.get(H_SIZE) != str(head.size):
                    continue  # a foreign chunk inside the version's range: not ours, skip it
                try:
                    blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream) or blob
                except BlobError as e:  # a forged chunk under our blob id: the signed digest decides
                    log.warning("global_chunk_skipped", version=head.version, detail=str(e)[:200])
        return blob

    def _sealed_key(self, head: GlobalHead) -> bytes:
        sealed_key = head.keys.get(self.boxes.me.name)
        if sealed_key is None:
            raise AuthenticationError(f"global {head.version} is not sealed to {self.boxes.me.name!r}")
        return sealed_key

    def record(self, head: GlobalHead) -> VersionRecord:
        """The coordinator's record of this version (who contributed, bytes, progress); with the
        coordinator's key also the part withheld from members (losses, the noise key)."""
        record = VersionRecord.from_bytes(open_secret(head.meta, open_version_key(self._sealed_key(head), self.boxes)))
        return disclosed(record, self.boxes.me.box) if self.boxes.me.name == COORDINATOR else record


def _view(head: GlobalHead) -> ViewRef:
    assert head.view is not None
    return head.view
