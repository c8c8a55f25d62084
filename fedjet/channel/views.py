"""Downlink views (a job with a ``+down`` codec), both ends.

Workers do not read each version's exact weights: the coordinator broadcasts a lossy *view*,
``C(W - B)`` on the view of an earlier version, with error feedback on its side
(:mod:`fedjet.codecs.downlink`). Each head names its view by hash and, when the view changed,
where the change's sealed blob sits (a :class:`~fedjet.codecs.heads.ViewRef`). A reader walks
back along the heads to a view it holds, or to one that is a version's own weights, and applies
the changes forward, checking every view against its signed hash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from fedjet.broker.blobs import PublishedBlob
from fedjet.codecs.downlink import decode_view, next_view_frame
from fedjet.codecs.heads import BlobRef
from fedjet.codecs.messages import GlobalHead, GlobalHeader, GlobalVersion, ViewRef
from fedjet.codecs.tensors import weights_hash
from fedjet.config.codec import CodecSpec
from fedjet.errors import AuthenticationError
from fedjet.log import get_logger
from fedjet.weights import Weights

if TYPE_CHECKING:
    from fedjet.channel.globals import GlobalFollower

log = get_logger("fedjet.channel")
SealAndPublish = Callable[[bytes, bytes, str], Awaitable[tuple[BlobRef, PublishedBlob]]]


class ViewPublisher:
    """The coordinator's side: the view workers hold, and a change to it when one is due."""

    def __init__(self, downlink: CodecSpec, job: str, *, view_every: int, seal_and_publish: SealAndPublish) -> None:
        self.downlink = downlink
        self.job = job
        self._seal_and_publish = seal_and_publish
        self._view: tuple[int, Weights] | None = None  # the broadcast view workers hold, and its version
        self._view_hash = ""
        self._view_changed = 0  # the version whose view last carried a change
        # Versions between changes of the view: an asynchronous job makes a version per update,
        # and a view change per version would cost the readers more than the update did.
        self.view_every = max(1, view_every)

    async def publish(self, version: int, hash_: str, weights: Weights) -> ViewRef:
        """The workers' copy: ``C(W - B)`` on the view of the last version. The first version
        after a start (or a restart, which does not know what workers hold) is its own view."""
        if self._view is None:
            self._view, self._view_hash, self._view_changed = (version, weights), hash_, version
            return ViewRef.without_blob(hash_)
        base, view = self._view
        if version - self._view_changed < self.view_every:  # unchanged: nothing to read
            self._view = (version, view)
            return ViewRef.without_blob(self._view_hash, base)
        header = GlobalHeader(job=self.job, version=version, hash=hash_, delta_from=base)
        frame, new_view, view_hash = await asyncio.to_thread(next_view_frame, weights, view, self.downlink, header)
        where, blob = await self._seal_and_publish(frame, b"", f"v/{version}")
        self._view, self._view_hash, self._view_changed = (version, new_view), view_hash, version
        log.info("view_published", version=version, base=base, bytes=blob.wire_bytes)
        return ViewRef(hash=view_hash, base=base, **where.blob_wire())


class ViewReader:
    """A worker's side: the view of a version, from the views it holds and the changes since."""

    def __init__(self, follower: GlobalFollower) -> None:
        self._follower = follower
        self._held: tuple[int, Weights] | None = None  # the last view fetched

    async def fetch(self, head: GlobalHead) -> GlobalVersion:
        """The view of ``head``: its change applied to the view of its base, walking back along
        the heads to a view this party holds or one that is a version's own weights."""
        follower = self._follower
        chain = [head]
        weights = self._known(head)
        while weights is None and _view(chain[-1]).base >= 0:
            previous = await follower.previous(chain[-1])
            if previous is None or previous.view is None or previous.version != _view(chain[-1]).base:
                raise AuthenticationError(f"global {head.version}: no way back to the view it changes")
            chain.append(previous)
            weights = self._known(previous)
        if weights is None:  # the view of the oldest one is that version's own weights
            weights = _checked(chain[-1], (await follower.fetch_weights(chain[-1])).tensors)
        for step in reversed(chain[:-1]):
            ref = _view(step)
            if not ref.blob_id:  # the view did not change at this version
                weights = _checked(step, weights)
                continue
            plaintext = await follower.read_blob(ref, step.version)
            changed = await asyncio.to_thread(decode_view, plaintext, follower.limits, weights)
            weights = _checked(step, changed.tensors)
        self._held = (head.version, weights)
        return GlobalVersion(replace(head.header, hash=_view(head).hash), weights)

    def _known(self, head: GlobalHead) -> Weights | None:
        if self._held is not None and self._held[0] == head.version:
            return self._held[1]
        local = self._follower.held_local(head.version)
        return local if local is not None and weights_hash(local) == _view(head).hash else None


def _checked(head: GlobalHead, weights: Weights) -> Weights:
    if weights_hash(weights) != _view(head).hash:
        raise AuthenticationError(f"global {head.version}: the view does not match the signed view hash")
    return weights


def _view(head: GlobalHead) -> ViewRef:
    assert head.view is not None
    return head.view
