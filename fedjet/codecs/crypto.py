"""End-to-end protection that does not trust the broker (PyNaCl).

* Updates: AES-256-GCM (OpenSSL, through ``cryptography``) under a key of its own for every
  message, derived (BLAKE2b) from a random salt and the pair key, which is itself derived
  (personalised "update") from the X25519 agreement of the worker's and the coordinator's
  keys - authenticated encryption, so only the coordinator can read an update and it knows
  which cloud's key sealed it. The raw ``Box`` of the same pair only wraps version keys: one
  domain can never open as the other.
* The envelope is a fixed binary header (magic, version, the sender's name, the salt, the
  plaintext size) and the plaintext sealed in segments of ``SEGMENT_BYTES``, each
  authenticating the header: nothing but that header is parsed before a segment
  authenticates, and :class:`UpdateOpener` opens an envelope segment by segment as its chunks
  arrive, so a reader never holds the ciphertext and the plaintext of a big update at once.
* Who sent an update: the pair key is symmetric, so whoever holds the coordinator's secret
  could seal an update "from" any cloud. Version 4 therefore ends with the sender's Ed25519
  signature (its long-term signing key, the one its ``.pub`` names) over the header, the
  recipient's public key and a SHA-256 digest of the plaintext, computed as the segments stream
  past (on a thread of its own: :class:`StreamDigest`). It is sealed as one more AES-GCM
  segment, so the broker cannot use it to confirm a guessed frame. The coordinator and
  ``fedjet replay`` check it before a frame is used, so the record proves which cloud sent
  what. The signed message has a prefix of its own, so it can never be passed off as a
  secure-aggregation message (msgpack) or the other way round.
* Global versions: encrypted once with a fresh ``SecretBox`` key per version; that key is
  sealed to every member with ``Box(coordinator_secret, member_public)``; the head that
  carries the sealed keys and the ciphertext digest is signed with the coordinator's
  ``SigningKey``. Workers verify the signature before they trust anything in it.
* Anti-replay: per (cloud, worker) sequence numbers must strictly increase.

Pure: keys come in as objects, bytes go out; files live in ``fedjet.keystore``.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.public import Box, PrivateKey, PublicKey
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from fedjet.errors import AuthenticationError, DecodeError, LimitError, ReplayError, SchemaError, ValidationError

ENVELOPE_VERSION = 4  # 1: msgpack, raw Box; 2: one SecretBox; 3: unsigned segments (1-3 only with legacy=True)
LEGACY_SEGMENTED = 3  # the segmented envelope without a signature: replay reads it, proving nothing of the sender
ENVELOPE_MAGIC = b"FJE"
MAX_SENDER_BYTES = 64
SALT_BYTES = 16
SEGMENT_BYTES = 1 << 20  # plaintext per AES-GCM segment: what a reader holds besides the plaintext
TAG_BYTES = 16
SIGNATURE_BYTES = 64  # Ed25519, sealed as the envelope's last segment
TRAILER_BYTES = SIGNATURE_BYTES + TAG_BYTES
HEADER_BYTES = len(ENVELOPE_MAGIC) + 2 + MAX_SENDER_BYTES + SALT_BYTES + 8  # the largest header
ENVELOPE_OVERHEAD = HEADER_BYTES + SecretBox.NONCE_SIZE + SecretBox.MACBYTES  # bound for versions 1-2
_MESSAGE_PERSON = b"fedjet-update-v3"  # BLAKE2b personalisation of the per-message key
COORDINATOR = "coordinator"
MAX_WORKERS_PER_CLOUD = 16  # keeps the anti-replay counters, and so every version record, small
_UPDATE_PERSON = b"fedjet-update-v2"  # BLAKE2b personalisation: the update key's domain
_SECAGG_PERSON = b"fedjet-secagg-v1"  # the secure-aggregation messages' domain
_SIGNED_PREFIX = b"fedjet-update-signature-v4\x00"  # what a sender's update signature is over, first
_SENDER = re.compile(rb"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class PublicIdentity:
    name: str
    box: PublicKey
    verify: VerifyKey


@dataclass(frozen=True)
class Identity:
    """A party's secret keys: one for encryption (Box), one for signatures."""

    name: str
    box: PrivateKey
    sign: SigningKey

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, PrivateKey.generate(), SigningKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.box.public_key, self.sign.verify_key)


@dataclass
class Boxes:
    """One ``Box`` per peer, built once: construction does the key agreement."""

    me: Identity
    peers: dict[str, PublicIdentity]
    _cache: dict[str, Box] = field(default_factory=dict)
    _update_keys: dict[str, SecretBox] = field(default_factory=dict)

    def public_of(self, name: str) -> PublicIdentity:
        identity = self.me.public if name == self.me.name else self.peers.get(name)
        if identity is None:
            raise AuthenticationError(f"no public key for {name!r:.40}")
        return identity

    def to(self, peer: str) -> Box:
        box = self._cache.get(peer)
        if box is None:
            box = self._cache[peer] = Box(self.me.box, self.public_of(peer).box)
        return box

    def updates_with(self, peer: str) -> SecretBox:
        """The key for updates between this party and ``peer``: derived from the agreement,
        so it never equals the raw ``Box`` that wraps version keys."""
        return self._derived(peer, _UPDATE_PERSON)

    def secagg_with(self, peer: str) -> SecretBox:
        """The key for secure-aggregation messages with ``peer``: a domain of its own, so a
        protocol message never opens as an update or the other way round."""
        return self._derived(peer, _SECAGG_PERSON)

    def update_key_with(self, peer: str) -> bytes:
        """The raw pair key for updates: each message's AES-GCM key is derived from it."""
        return bytes(self.updates_with(peer))

    def _derived(self, peer: str, person: bytes) -> SecretBox:
        box = self._update_keys.get(f"{person.decode()}/{peer}")
        if box is None:
            shared = self.to(peer).shared_key()
            key = nacl.hash.blake2b(shared, digest_size=32, person=person, encoder=nacl.encoding.RawEncoder)
            box = self._update_keys[f"{person.decode()}/{peer}"] = SecretBox(key)
        return box


# --- updates: worker -> coordinator --------------------------------------------------------


def sealed_size(plain_bytes: int, sender: str = "x" * MAX_SENDER_BYTES, version: int = ENVELOPE_VERSION) -> int:
    """Bytes of the envelope that seals ``plain_bytes`` (the longest sender by default: a bound)."""
    trailer = TRAILER_BYTES if version >= 4 else 0
    return 5 + len(sender.encode()) + SALT_BYTES + 8 + plain_bytes + TAG_BYTES * _segments(plain_bytes) + trailer


def envelope_limit(max_frame_bytes: int) -> int:
    """The largest envelope a reader takes for frames up to ``max_frame_bytes``: any version."""
    return max(sealed_size(max_frame_bytes), max_frame_bytes + ENVELOPE_OVERHEAD)


def _segments(plain_bytes: int) -> int:
    return max(1, math.ceil(plain_bytes / SEGMENT_BYTES))


def _message_cipher(pair_key: bytes, salt: bytes) -> AESGCM:
    key = nacl.hash.blake2b(
        salt, key=pair_key, digest_size=32, person=_MESSAGE_PERSON, encoder=nacl.encoding.RawEncoder
    )
    return AESGCM(key)


def _nonce(index: int) -> bytes:
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
        sender = boxes.me.name.encode()
        if not _SENDER.fullmatch(sender):
            raise SchemaError(f"sender name {boxes.me.name!r:.40} must match [A-Za-z0-9_-]{{1,64}}")
        salt = secrets.token_bytes(SALT_BYTES)
        self.frame = memoryview(frame).cast("B")
        self.header = b"".join(
            (ENVELOPE_MAGIC, bytes((ENVELOPE_VERSION, len(sender))), sender, salt, len(self.frame).to_bytes(8, "big"))
        )
        self._cipher = _message_cipher(boxes.update_key_with(COORDINATOR), salt)
        self._size = sealed_size(len(self.frame), boxes.me.name)
        self._count = _segments(len(self.frame))
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
        view, head = memoryview(out), len(self.header)
        if start < head:
            out[: min(head, end) - start] = self.header[start : min(head, end)]
        stride = SEGMENT_BYTES + TAG_BYTES
        first, last = max(0, start - head) // stride, max(0, end - 1 - head) // stride
        for i in range(first, min(last, self._count - 1) + 1):
            at = head + i * stride  # the segment's place in the envelope
            plain = self.frame[i * SEGMENT_BYTES : (i + 1) * SEGMENT_BYTES]
            sealed_end = at + len(plain) + TAG_BYTES
            if sealed_end <= start or at >= end:
                continue
            self._digest_through(i)
            if start <= at and sealed_end <= end:  # wholly inside: straight into place
                self._cipher.encrypt_into(_nonce(i), plain, self.header, view[at - start : sealed_end - start])
            else:  # cut by the range: seal it whole, keep the part asked for
                sealed = self._cipher.encrypt(_nonce(i), bytes(plain), self.header)
                lo, hi = max(start, at), min(end, sealed_end)
                view[lo - start : hi - start] = sealed[lo - at : hi - at]
        at = self._size - TRAILER_BYTES
        if end > at:
            trailer = self._sealed_signature()
            lo = max(start, at)
            view[lo - start : end - start] = trailer[lo - at : end - at]
        return out

    def _digest_through(self, index: int) -> None:
        while self._digested <= index:
            self._digest.update(self.frame[self._digested * SEGMENT_BYTES : (self._digested + 1) * SEGMENT_BYTES])
            self._digested += 1

    def _sealed_signature(self) -> bytes:
        if self._trailer is None:
            self._digest_through(self._count - 1)  # any segment no range has asked for yet
            message = update_signed_message(self.header, self._recipient, self._digest.digest())
            signature = self._signer.sign(message).signature
            self._trailer = self._cipher.encrypt(_nonce(self._count), signature, self.header)
        return self._trailer


def seal_update(frame: bytes, boxes: Boxes) -> bytes:
    """Encrypt a frame from ``boxes.me`` (a cloud) to the coordinator, behind a fixed header,
    in AES-GCM segments under a fresh per-message key (nonces are segment indices), ending
    with ``boxes.me``'s sealed signature."""
    sealed = SealedUpdate(frame, boxes)
    return sealed.read(0, len(sealed))  # type: ignore[return-value]  # a bytearray: a copy would cost as much


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
        sender = _sender_name(bytes(data[5:end]))
        if sender not in self.senders or sender == COORDINATOR:
            raise AuthenticationError(f"update from {sender!r}, which may not send updates here")
        version = data[3]
        size = int.from_bytes(data[end + SALT_BYTES : end + SALT_BYTES + 8], "big")
        if sealed_size(size, sender, version) > self.max_bytes:
            raise LimitError(f"update envelope declares {size} bytes > limit {self.max_bytes}")
        header_end = end + SALT_BYTES + 8
        self.sender, self.version, self._size, self._header = sender, version, size, bytes(data[:header_end])
        self._count = _segments(size)
        self._pieces = self._count + (1 if version >= 4 else 0)
        self._cipher = _message_cipher(self.boxes.update_key_with(sender), bytes(data[end : end + SALT_BYTES]))
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
                self._signature = self._cipher.decrypt(_nonce(index), sealed, self._header)
            elif self._plain is None:  # the first segment authenticates the size before it is taken
                first = self._cipher.decrypt(_nonce(index), sealed, self._header)
                self._plain = bytearray(self._size)
                self._plain[: len(first)] = first
                self._digest_segment(memoryview(self._plain)[: len(first)])
            else:
                at = index * SEGMENT_BYTES
                target = memoryview(self._plain)[at : at + len(sealed) - TAG_BYTES]
                self._cipher.decrypt_into(_nonce(index), sealed, self._header, target)
                self._digest_segment(target)
        except InvalidTag as e:
            raise AuthenticationError(
                f"update claiming to be from {self.sender!r} does not decrypt (segment {index})"
            ) from e
        self._segment += 1

    def _digest_segment(self, plain: bytes | memoryview) -> None:
        if self.version >= 4:
            self._digest.update(plain)


SECAGG_MAGIC = b"FJS"
SECAGG_VERSION = 1


def seal_secagg(payload: bytes, boxes: Boxes, to: str) -> bytes:
    """A secure-aggregation step from ``boxes.me`` to ``to`` (either side), behind a fixed header."""
    sender = boxes.me.name.encode()
    if not _SENDER.fullmatch(sender):
        raise SchemaError(f"sender name {boxes.me.name!r:.40} must match [A-Za-z0-9_-]{{1,64}}")
    ciphertext = boxes.secagg_with(to).encrypt(payload)
    return b"".join((SECAGG_MAGIC, bytes((SECAGG_VERSION, len(sender))), sender, bytes(ciphertext)))


def open_secagg(envelope: bytes, boxes: Boxes, max_bytes: int, *, senders: Collection[str]) -> tuple[str, bytes]:
    """(sender, step bytes): only the fixed header is read before decryption, and a sender
    outside ``senders`` is refused before any key is used."""
    if len(envelope) > max_bytes:
        raise LimitError(f"secure-aggregation message of {len(envelope)} bytes > limit {max_bytes}")
    if envelope[:3] != SECAGG_MAGIC or len(envelope) < 5 or envelope[3] != SECAGG_VERSION:
        raise DecodeError("not a fedjet secure-aggregation envelope")
    end = 5 + envelope[4]
    if envelope[4] > MAX_SENDER_BYTES or len(envelope) < end + SecretBox.NONCE_SIZE + SecretBox.MACBYTES:
        raise DecodeError("secure-aggregation envelope is too short")
    sender = _sender_name(envelope[5:end])
    if sender not in senders:
        raise AuthenticationError(f"secure-aggregation message from {sender!r}, which is not in this round")
    try:
        return sender, boxes.secagg_with(sender).decrypt(envelope[end:])
    except nacl.exceptions.CryptoError as e:
        raise AuthenticationError(f"secure-aggregation message claiming to be from {sender!r} does not decrypt") from e


def envelope_sender(envelope: bytes) -> tuple[str, int, int]:
    """(sender, envelope version, offset just past the sender) from the fixed header alone."""
    if envelope[:3] == ENVELOPE_MAGIC:
        if len(envelope) < 5 or envelope[3] not in (2, LEGACY_SEGMENTED, ENVELOPE_VERSION):
            raise SchemaError(f"unknown envelope version {envelope[3:4]!r}")
        end = 5 + envelope[4]
        if envelope[4] > MAX_SENDER_BYTES or len(envelope) < end:
            raise DecodeError("envelope sender does not fit the header")
        return _sender_name(envelope[5:end]), envelope[3], end
    return _legacy_header(envelope)


def _sender_name(raw: bytes) -> str:
    if not _SENDER.fullmatch(raw):
        raise DecodeError("envelope sender is not a valid name")
    return raw.decode()


def _legacy_header(envelope: bytes) -> tuple[str, int, int]:
    """Version 1 was ``msgpack {"ev": 1, "from": name, "ct": bin}`` in that order: read as a
    fixed layout, never by a general parser."""
    prefix = b"\x83\xa2ev\x01\xa4from"
    if not envelope.startswith(prefix) or len(envelope) < len(prefix) + 1:
        raise DecodeError("not a fedjet update envelope")
    at = len(prefix)
    if 0xA1 <= envelope[at] <= 0xBF:  # fixstr
        length, at = envelope[at] & 0x1F, at + 1
    elif envelope[at] == 0xD9 and len(envelope) > at + 1:  # str8
        length, at = envelope[at + 1], at + 2
    else:
        raise DecodeError("not a fedjet update envelope (sender)")
    if length > MAX_SENDER_BYTES or len(envelope) < at + length:
        raise DecodeError("not a fedjet update envelope (sender)")
    sender = _sender_name(envelope[at : at + length])
    at += length
    widths = {0xC4: 1, 0xC5: 2, 0xC6: 4}
    if envelope[at : at + 3] != b"\xa2ct" or len(envelope) < at + 4 or envelope[at + 3] not in widths:
        raise DecodeError("not a fedjet update envelope (ciphertext)")
    width = widths[envelope[at + 3]]
    start = at + 4 + width
    if int.from_bytes(envelope[at + 4 : start], "big") != len(envelope) - start:
        raise DecodeError("update envelope length does not match its ciphertext")
    return sender, 1, start


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
    nonce_end = start + SecretBox.NONCE_SIZE
    if len(envelope) < nonce_end + SecretBox.MACBYTES:
        raise DecodeError("update envelope is shorter than a nonce and a MAC")
    try:
        if version == 2:
            nonce, ciphertext = envelope[start:nonce_end], envelope[nonce_end:]
            return sender, boxes.updates_with(sender).decrypt(ciphertext, nonce)
        return sender, boxes.to(sender).decrypt(envelope[start:])
    except nacl.exceptions.CryptoError as e:
        raise AuthenticationError(f"update claiming to be from {sender!r} does not decrypt") from e


@dataclass
class ReplayGuard:
    """Per (cloud, worker) sequence numbers must strictly increase; at most
    ``max_workers`` worker ids per cloud (each costs room in every version record)."""

    last: dict[str, int] = field(default_factory=dict)
    max_workers: int = MAX_WORKERS_PER_CLOUD

    def check(self, cloud: str, worker: str, seq: int) -> None:
        key = f"{cloud}/{worker}"
        previous = self.last.get(key)
        if previous is not None and seq <= previous:
            raise ReplayError(f"{key} sequence {seq} <= last accepted {previous}")
        if previous is None and sum(k.startswith(f"{cloud}/") for k in self.last) >= self.max_workers:
            raise ValidationError(f"{cloud} already has {self.max_workers} workers; {worker!r:.40} is one too many")
        self.last[key] = seq


# --- globals: coordinator -> members --------------------------------------------------------


@dataclass(frozen=True)
class SealedGlobal:
    ciphertext: bytes  # the weights
    meta: bytes  # the coordinator's record of how this version was made
    keys: dict[str, bytes]  # member -> version key sealed to that member


def seal_global(payload: bytes, meta: bytes, boxes: Boxes, members: list[str]) -> SealedGlobal:
    """One fresh key per version encrypts weights and record; each member gets it sealed."""
    key = nacl.utils.random(SecretBox.KEY_SIZE)
    box = SecretBox(key)
    sealed = {m: bytes(boxes.to(m).encrypt(key)) for m in members}
    return SealedGlobal(bytes(box.encrypt(payload)), bytes(box.encrypt(meta)), sealed)


def open_version_key(sealed_key: bytes, boxes: Boxes) -> bytes:
    try:
        return boxes.to(COORDINATOR).decrypt(sealed_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as e:
        raise AuthenticationError("the version key does not open with this member's key") from e


def open_secret(ciphertext: bytes, key: bytes) -> bytes:
    try:
        return SecretBox(key).decrypt(ciphertext)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as e:
        raise AuthenticationError("global version does not decrypt (tampered or wrong key)") from e


def open_global(ciphertext: bytes, sealed_key: bytes, boxes: Boxes) -> bytes:
    """Decrypt a global version with this member's sealed copy of the version key."""
    return open_secret(ciphertext, open_version_key(sealed_key, boxes))


def sign(body: bytes, me: Identity) -> bytes:
    return bytes(me.sign.sign(body))


def verify(signed: bytes, signer: PublicIdentity) -> bytes:
    try:
        return signer.verify.verify(signed)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
        raise AuthenticationError(f"signature by {signer.name} does not verify") from e


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
