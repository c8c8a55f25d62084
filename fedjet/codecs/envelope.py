"""The update envelope (version 4), sealing side: a worker's frame to the coordinator.

AES-256-GCM (OpenSSL, through ``cryptography``) under a key of its own for every message,
derived (BLAKE2b) from a random salt and the pair key of the worker and the coordinator. The
envelope is a fixed binary header (magic, version, the sender's name, the salt, the plaintext
size) and the plaintext sealed in segments of ``SEGMENT_BYTES``, each authenticating the
header, ending with the sender's Ed25519 signature over the header, the recipient's public key
and a SHA-256 digest of the plaintext, sealed as one more segment (so the broker cannot use it
to confirm a guessed frame). The signed message has a prefix of its own, so it can never be
passed off as a secure-aggregation message or the other way round. The reading side is
:mod:`fedjet.codecs.opener`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import nacl.encoding
import nacl.hash
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.public import PublicKey
from nacl.secret import SecretBox

from fedjet.codecs.identity import COORDINATOR, MAX_SENDER_BYTES, Boxes, sender_bytes

ENVELOPE_VERSION = 4  # 1: msgpack, raw Box; 2: one SecretBox; 3: unsigned segments (1-3 only with legacy=True)
LEGACY_SEGMENTED = 3  # the segmented envelope without a signature: replay reads it, proving nothing of the sender
ENVELOPE_MAGIC = b"FJE"
SALT_BYTES = 16
SEGMENT_BYTES = 1 << 20  # plaintext per AES-GCM segment: what a reader holds besides the plaintext
TAG_BYTES = 16
SIGNATURE_BYTES = 64  # Ed25519, sealed as the envelope's last segment
TRAILER_BYTES = SIGNATURE_BYTES + TAG_BYTES
HEADER_BYTES = len(ENVELOPE_MAGIC) + 2 + MAX_SENDER_BYTES + SALT_BYTES + 8  # the largest header
ENVELOPE_OVERHEAD = HEADER_BYTES + SecretBox.NONCE_SIZE + SecretBox.MACBYTES  # bound for versions 1-2
_MESSAGE_PERSON = b"fedjet-update-v3"  # BLAKE2b personalisation of the per-message key
_SIGNED_PREFIX = b"fedjet-update-signature-v4\x00"  # what a sender's update signature is over, first


def sealed_size(plain_bytes: int, sender: str = "x" * MAX_SENDER_BYTES, version: int = ENVELOPE_VERSION) -> int:
    """Bytes of the envelope that seals ``plain_bytes`` (the longest sender by default: a bound)."""
    trailer = TRAILER_BYTES if version >= 4 else 0
    return 5 + len(sender.encode()) + SALT_BYTES + 8 + plain_bytes + TAG_BYTES * segment_count(plain_bytes) + trailer


def envelope_limit(max_frame_bytes: int) -> int:
    """The largest envelope a reader takes for frames up to ``max_frame_bytes``: any version."""
    return max(sealed_size(max_frame_bytes), max_frame_bytes + ENVELOPE_OVERHEAD)


def segment_count(plain_bytes: int) -> int:
    return max(1, math.ceil(plain_bytes / SEGMENT_BYTES))


def message_cipher(pair_key: bytes, salt: bytes) -> AESGCM:
    """The AES-GCM key of one message: derived from its salt under the pair key."""
    key = nacl.hash.blake2b(
        salt, key=pair_key, digest_size=32, person=_MESSAGE_PERSON, encoder=nacl.encoding.RawEncoder
    )
    return AESGCM(key)


def segment_nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


class StreamDigest:
    """SHA-256 of pieces handed in order. Big pieces are hashed on a thread of this digest's own
    (hashlib lets go of the GIL), so on a machine with a spare core the digest overlaps the
    AES-GCM work and the network instead of adding to them; the pieces must stay unchanged
    until :meth:`digest`, which waits for them."""

    THREAD_MIN = 1 << 16  # smaller pieces are hashed at once: a thread hand-off would cost more

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        if len(piece) < self.THREAD_MIN:
            if self._last is not None:
                self._last.result()  # keep the order
            self._hash.update(piece)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedjet-digest")
        self._last = self._pool.submit(self._hash.update, piece)

    def digest(self) -> bytes:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # every piece handed in is hashed, in order
            self._pool, self._last = None, None
        return self._hash.digest()


def seal_segments_into(
    view: memoryview,
    start: int,
    end: int,
    header: bytes,
    plain_size: int,
    cipher: AESGCM,
    segment: Callable[[int], bytes | bytearray | memoryview],
) -> None:
    """Bytes ``[start, end)`` of a segmented message (``header``, then ``plain_size`` bytes in
    AES-GCM segments of ``SEGMENT_BYTES``, nonce the index, the header authenticated by each)
    written into ``view``; ``segment(i)`` gives segment i's plaintext, asked only for segments
    the range touches. Whatever follows the last segment is the caller's."""
    head, stride = len(header), SEGMENT_BYTES + TAG_BYTES
    if start < head:
        view[: min(head, end) - start] = header[start : min(head, end)]
    count = segment_count(plain_size)
    first, last = max(0, start - head) // stride, max(0, end - 1 - head) // stride
    for i in range(first, min(last, count - 1) + 1):
        at = head + i * stride  # the segment's place in the message
        sealed_end = at + min(SEGMENT_BYTES, plain_size - i * SEGMENT_BYTES) + TAG_BYTES
        if sealed_end <= start or at >= end:
            continue
        plain = segment(i)
        if start <= at and sealed_end <= end:  # wholly inside: straight into place
            cipher.encrypt_into(segment_nonce(i), plain, header, view[at - start : sealed_end - start])
        else:  # cut by the range: seal it whole, keep the part asked for
            sealed = cipher.encrypt(segment_nonce(i), bytes(plain), header)
            lo, hi = max(start, at), min(end, sealed_end)
            view[lo - start : hi - start] = sealed[lo - at : hi - at]


def update_signed_message(header: bytes, recipient: PublicKey, frame_digest: bytes) -> bytes:
    """What a version-4 sender signs: a prefix no other signed message of fedjet starts with,
    the envelope's header (sender, salt, size), the public key it was sealed to and the digest
    of the plaintext - so a signature vouches for one frame, from one sender, to one coordinator."""
    return b"".join((_SIGNED_PREFIX, len(header).to_bytes(1, "big"), header, bytes(recipient), frame_digest))


class SealedUpdate:
    """An update envelope from ``boxes.me`` (a cloud) to the coordinator whose bytes are sealed
    when they are read: a publisher reads it chunk by chunk, so sealing overlaps sending and no
    sealed copy of a big update is ever held. AES-GCM is deterministic for one key, nonce and
    plaintext, and so is Ed25519, so reading a range twice (a re-sent chunk) gives the same
    bytes. The digest that ``boxes.me`` signs is taken segment by segment, in order, as the
    segments are first read: one pass over the frame, shared with the sealing."""

    def __init__(self, frame: bytes | bytearray | memoryview, boxes: Boxes) -> None:
        sender = sender_bytes(boxes.me.name)
        salt = secrets.token_bytes(SALT_BYTES)
        self.frame = memoryview(frame).cast("B")
        self.header = b"".join(
            (ENVELOPE_MAGIC, bytes((ENVELOPE_VERSION, len(sender))), sender, salt, len(self.frame).to_bytes(8, "big"))
        )
        self._cipher = message_cipher(boxes.update_key_with(COORDINATOR), salt)
        self._size = sealed_size(len(self.frame), boxes.me.name)
        self._count = segment_count(len(self.frame))
        self._signer = boxes.me.sign
        self._recipient = boxes.public_of(COORDINATOR).box
        self._digest = StreamDigest()
        self._digested = 0  # segments taken into the digest, in order
        self._trailer: bytes | None = None

    def __len__(self) -> int:
        return self._size

    def read(self, start: int, end: int) -> bytearray:
        """Envelope bytes ``[start, end)``."""
        start, end = max(0, start), min(end, self._size)
        out = bytearray(max(0, end - start))
        view = memoryview(out)
        seal_segments_into(view, start, end, self.header, len(self.frame), self._cipher, self._segment)
        at = self._size - TRAILER_BYTES
        if end > at:
            trailer = self._sealed_signature()
            lo = max(start, at)
            view[lo - start : end - start] = trailer[lo - at : end - at]
        return out

    def _segment(self, index: int) -> memoryview:
        """Segment ``index`` of the frame, taken into the digest (with every one before it) first."""
        self._digest_through(index)
        return self.frame[index * SEGMENT_BYTES : (index + 1) * SEGMENT_BYTES]

    def _digest_through(self, index: int) -> None:
        while self._digested <= index:
            self._digest.update(self.frame[self._digested * SEGMENT_BYTES : (self._digested + 1) * SEGMENT_BYTES])
            self._digested += 1

    def _sealed_signature(self) -> bytes:
        if self._trailer is None:
            self._digest_through(self._count - 1)  # any segment no range has asked for yet
            message = update_signed_message(self.header, self._recipient, self._digest.digest())
            signature = self._signer.sign(message).signature
            self._trailer = self._cipher.encrypt(segment_nonce(self._count), signature, self.header)
        return self._trailer


def seal_update(frame: bytes, boxes: Boxes) -> bytes:
    """Encrypt a frame from ``boxes.me`` (a cloud) to the coordinator, behind a fixed header,
    in AES-GCM segments under a fresh per-message key (nonces are segment indices), ending
    with ``boxes.me``'s sealed signature."""
    sealed = SealedUpdate(frame, boxes)
    return sealed.read(0, len(sealed))  # type: ignore[return-value]  # a bytearray: a copy would cost as much
