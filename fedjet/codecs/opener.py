"""The update envelope, reading side: checks the header, opens the segments as they arrive and
verifies the sender's signature before a frame is handed on. Versions 1 to 3 are read only with
``legacy`` (recorded stores), and prove nothing about who sent them."""

from __future__ import annotations

from collections.abc import Collection

import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedjet.codecs.envelope import (
    ENVELOPE_MAGIC,
    ENVELOPE_VERSION,
    HEADER_BYTES,
    LEGACY_SEGMENTED,
    SALT_BYTES,
    SEGMENT_BYTES,
    TAG_BYTES,
    TRAILER_BYTES,
    StreamDigest,
    message_cipher,
    sealed_size,
    segment_count,
    segment_nonce,
    update_signed_message,
)
from fedjet.codecs.identity import COORDINATOR, MAX_SENDER_BYTES, Boxes, sender_name
from fedjet.codecs.legacy import legacy_header, open_legacy
from fedjet.errors import AuthenticationError, DecodeError, LimitError, SchemaError


class UpdateOpener:
    """Opens one version-4 envelope (also version 3 with ``legacy``) from its bytes as they
    arrive, segment by segment.

    ``feed`` takes the next bytes of the envelope (any split); the header is checked as soon
    as it is complete (version, a sender in ``senders``, a size within ``max_bytes``) and no
    key is used before. Plaintext space is taken only once the first segment authenticates
    the header that declares its size; after that each segment is decrypted into place (and
    into the running digest), so the opener holds the plaintext and at most one segment of
    ciphertext. ``finish`` checks the sender's signature over that digest with the sender's
    public key and only then returns ``(sender, frame)``. Every failure is a
    :class:`~fedjet.errors.CodecError`; a missing or wrong signature an
    :class:`~fedjet.errors.AuthenticationError`.
    """

    def __init__(self, boxes: Boxes, max_bytes: int, *, senders: Collection[str], legacy: bool = False) -> None:
        self.boxes = boxes
        self.max_bytes = max_bytes
        self.senders = senders
        self.legacy = legacy
        self.sender = ""
        self.version = 0
        self._header = b""
        self._cipher: AESGCM | None = None
        self._size = -1  # plaintext bytes, once the header is read
        self._count = 0  # data segments, once the header is read
        self._pieces = 0  # sealed pieces: the data segments and, from version 4, the signature
        self._pending = bytearray()  # bytes not yet forming a whole header or segment
        self._plain: bytearray | None = None
        self._digest = StreamDigest()
        self._signature = b""
        self._segment = 0
        self.fed = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.fed += len(data)
        if self.fed > self.max_bytes:
            raise LimitError(f"update envelope of more than {self.max_bytes} bytes")
        view = memoryview(data)
        if self._cipher is None:  # take no more than a header can be: the rest stays the caller's
            take = HEADER_BYTES - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if not self._read_header():
                return
        while self._segment < self._pieces:
            need = self._piece_bytes(self._segment)
            if self._pending:  # a segment split across feeds (or begun in a header's read): complete it first
                take = max(0, min(need - len(self._pending), len(view)))
                self._pending += view[:take]
                view = view[take:]
                if len(self._pending) < need:
                    return
                self._open_segment(memoryview(self._pending)[:need])
                self._pending = self._pending[need:]  # what a header's read took past a small segment
                continue
            if len(view) < need:
                break
            self._open_segment(view[:need])  # straight from the caller's bytes: no copy
            view = view[need:]
        self._pending += view  # less than a segment, or bytes past the last one (refused by finish)

    def finish(self) -> tuple[str, bytes]:
        if self._cipher is not None and self._segment == self._count < self._pieces:
            raise AuthenticationError(f"update claiming to be from {self.sender!r} ends without its signature")
        if self._cipher is None or self._segment < self._pieces:
            raise DecodeError("update envelope ends before its last segment")
        if self._pending:
            raise DecodeError("update envelope has bytes after its last segment")
        assert self._plain is not None
        if self.version >= 4:
            self._verify()
        return self.sender, self._plain  # type: ignore[return-value]  # a bytearray: no copy of a big frame

    def _verify(self) -> None:
        signer = self.boxes.public_of(self.sender)
        message = update_signed_message(self._header, self.boxes.me.box.public_key, self._digest.digest())
        try:
            signer.verify.verify(message, self._signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
            raise AuthenticationError(
                f"update claiming to be from {self.sender!r} is not signed by {self.sender}'s key"
            ) from e

    def _read_header(self) -> bool:
        data = self._pending
        if len(data) < 5:
            return False
        if data[:3] != ENVELOPE_MAGIC:
            raise DecodeError("not a fedjet update envelope")
        if data[3] != ENVELOPE_VERSION and not (self.legacy and data[3] == LEGACY_SEGMENTED):
            raise SchemaError(f"envelope version {data[3]} is not accepted here (this build reads {ENVELOPE_VERSION})")
        end = 5 + data[4]
        if data[4] > MAX_SENDER_BYTES:
            raise DecodeError("envelope sender does not fit the header")
        if len(data) < end + SALT_BYTES + 8:
            return False
        sender = sender_name(bytes(data[5:end]))
        if sender not in self.senders or sender == COORDINATOR:
            raise AuthenticationError(f"update from {sender!r}, which may not send updates here")
        version = data[3]
        size = int.from_bytes(data[end + SALT_BYTES : end + SALT_BYTES + 8], "big")
        if sealed_size(size, sender, version) > self.max_bytes:
            raise LimitError(f"update envelope declares {size} bytes > limit {self.max_bytes}")
        header_end = end + SALT_BYTES + 8
        self.sender, self.version, self._size, self._header = sender, version, size, bytes(data[:header_end])
        self._count = segment_count(size)
        self._pieces = self._count + (1 if version >= 4 else 0)
        self._cipher = message_cipher(self.boxes.update_key_with(sender), bytes(data[end : end + SALT_BYTES]))
        del self._pending[:header_end]
        return True

    def _piece_bytes(self, index: int) -> int:
        if index == self._count:
            return TRAILER_BYTES
        return min(SEGMENT_BYTES, self._size - index * SEGMENT_BYTES) + TAG_BYTES

    def _open_segment(self, sealed: memoryview) -> None:
        assert self._cipher is not None
        index = self._segment
        try:
            if index == self._count:  # the sealed signature, checked by finish
                self._signature = self._cipher.decrypt(segment_nonce(index), sealed, self._header)
            elif self._plain is None:  # the first segment authenticates the size before it is taken
                first = self._cipher.decrypt(segment_nonce(index), sealed, self._header)
                self._plain = bytearray(self._size)
                self._plain[: len(first)] = first
                self._digest_segment(memoryview(self._plain)[: len(first)])
            else:
                at = index * SEGMENT_BYTES
                target = memoryview(self._plain)[at : at + len(sealed) - TAG_BYTES]
                self._cipher.decrypt_into(segment_nonce(index), sealed, self._header, target)
                self._digest_segment(target)
        except InvalidTag as e:
            raise AuthenticationError(
                f"update claiming to be from {self.sender!r} does not decrypt (segment {index})"
            ) from e
        self._segment += 1

    def _digest_segment(self, plain: bytes | memoryview) -> None:
        if self.version >= 4:
            self._digest.update(plain)


def envelope_sender(envelope: bytes) -> tuple[str, int, int]:
    """(sender, envelope version, offset just past the sender) from the fixed header alone."""
    if envelope[:3] == ENVELOPE_MAGIC:
        if len(envelope) < 5 or envelope[3] not in (2, LEGACY_SEGMENTED, ENVELOPE_VERSION):
            raise SchemaError(f"unknown envelope version {envelope[3:4]!r}")
        end = 5 + envelope[4]
        if envelope[4] > MAX_SENDER_BYTES or len(envelope) < end:
            raise DecodeError("envelope sender does not fit the header")
        return sender_name(envelope[5:end]), envelope[3], end
    return legacy_header(envelope)


def open_update(
    envelope: bytes, boxes: Boxes, max_bytes: int, *, senders: Collection[str] | None = None, legacy: bool = False
) -> tuple[str, bytes]:
    """(sender, frame) of a whole sealed update. Only the fixed header is read before
    decryption; a sender outside ``senders`` (default: every peer) is refused before any key is
    used; a version-4 envelope must carry the sender's signature. ``legacy`` also reads
    versions 1 to 3 (stores recorded by earlier builds), which prove nothing about who sent
    them: anyone holding the coordinator's key could have sealed them."""
    if len(envelope) > max_bytes:
        raise LimitError(f"update envelope of {len(envelope)} bytes > limit {max_bytes}")
    sender, version, start = envelope_sender(envelope)
    allowed = boxes.peers if senders is None else senders
    if sender not in allowed or sender == COORDINATOR:
        raise AuthenticationError(f"update from {sender!r}, which may not send updates here")
    if version == ENVELOPE_VERSION or (legacy and version == LEGACY_SEGMENTED):
        opener = UpdateOpener(boxes, max_bytes, senders=allowed, legacy=legacy)
        opener.feed(envelope)
        return opener.finish()
    if not legacy:
        raise SchemaError(f"envelope version {version} is no longer accepted (this build reads {ENVELOPE_VERSION})")
    return sender, open_legacy(envelope, boxes, sender, version, start)
