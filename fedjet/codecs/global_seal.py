"""Global versions, coordinator to members: encrypted once under a fresh key per version; that
key is sealed to every member with ``Box(coordinator_secret, member_public)``. The head that
carries the sealed keys and the ciphertext's digest is signed by the coordinator
(:mod:`fedjet.channel`).

Two seals, named by the head (``seal``): ``STREAMED`` (2, what is published) is AES-256-GCM in
segments, made as the publisher reads it, so neither a whole-model frame nor its ciphertext is
ever held by the coordinator; ``ONE_BOX`` (1) is one ``SecretBox`` over the whole frame, what
recorded runs before it hold and replay still opens. The version's record (``meta``) is a
``SecretBox`` under the version key in both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl._sodium import ffi, lib  # type: ignore[import-not-found]  # libsodium, as PyNaCl binds it
from nacl.secret import SecretBox

from fedjet.codecs.envelope import SEGMENT_BYTES, TAG_BYTES, seal_segments_into, segment_count, segment_nonce
from fedjet.codecs.frame import FramePieces
from fedjet.codecs.identity import COORDINATOR, Boxes
from fedjet.errors import AuthenticationError

ONE_BOX = 1
STREAMED = 2
SEALS = (ONE_BOX, STREAMED)
GLOBAL_MAGIC = b"FJG"
SEAL_HEADER_BYTES = len(GLOBAL_MAGIC) + 1 + 8  # magic, seal, plaintext size
_SEGMENT_PERSON = b"fedjet-global-v2"  # the segments' AES key, derived from the version key


@dataclass(frozen=True)
class SealedGlobal:
    ciphertext: bytes  # the weights
    meta: bytes  # the coordinator's record of how this version was made
    keys: dict[str, bytes]  # member -> version key sealed to that member


def seal_global(payload: bytes | memoryview, meta: bytes, boxes: Boxes, members: list[str]) -> SealedGlobal:
    """One fresh key per version encrypts weights and record; each member gets it sealed."""
    key = nacl.utils.random(SecretBox.KEY_SIZE)
    box = SecretBox(key)
    sealed = {m: bytes(boxes.to(m).encrypt(key)) for m in members}
    return SealedGlobal(secretbox_into(payload, key), bytes(box.encrypt(meta)), sealed)


def streamed_size(plain_bytes: int) -> int:
    return SEAL_HEADER_BYTES + plain_bytes + TAG_BYTES * segment_count(plain_bytes)


def _segment_cipher(version_key: bytes) -> AESGCM:
    """The segments' own key: the version key also seals the record with ``SecretBox``, and one
    key is not used by two ciphers."""
    return AESGCM(
        nacl.hash.blake2b(
            b"", key=version_key, digest_size=32, person=_SEGMENT_PERSON, encoder=nacl.encoding.RawEncoder
        )
    )


class StreamedSeal:
    """A version's ciphertext (seal ``STREAMED``) made as it is read: a fixed header (magic,
    seal, plaintext size), then the plaintext in AES-GCM segments of ``SEGMENT_BYTES``, nonce
    the segment's index, every segment authenticating the header (so none can be moved, cut
    or resized). AES-GCM is deterministic for one key, nonce and plaintext: reading a range
    twice (a re-sent chunk) gives the same bytes. The SHA-256 of the ciphertext, which the
    signed head carries, is taken as the publisher reads it in order."""

    def __init__(self, plaintext: FramePieces | bytes | bytearray | memoryview, version_key: bytes) -> None:
        self.plain = plaintext if isinstance(plaintext, FramePieces) else FramePieces([plaintext])
        self.header = GLOBAL_MAGIC + bytes((STREAMED,)) + len(self.plain).to_bytes(8, "big")
        self._cipher = _segment_cipher(version_key)
        self._size = streamed_size(len(self.plain))
        self._hash = hashlib.sha256()
        self._hashed = 0  # ciphertext bytes taken into the digest, from the start
        self._buffer = bytearray(SEGMENT_BYTES)  # one segment's plaintext at a time

    def __len__(self) -> int:
        return self._size

    def read(self, start: int, end: int) -> bytearray:
        start, end = max(0, start), min(end, self._size)
        out = bytearray(max(0, end - start))
        view = memoryview(out)
        seal_segments_into(view, start, end, self.header, len(self.plain), self._cipher, self._segment)
        if start <= self._hashed < end:
            self._hash.update(view[self._hashed - start :])
            self._hashed = end
        return out

    def _segment(self, index: int) -> memoryview:
        """Segment ``index`` of the plaintext, copied out of its pieces into one buffer."""
        piece = memoryview(self._buffer)[: min(SEGMENT_BYTES, len(self.plain) - index * SEGMENT_BYTES)]
        self.plain.read_into(index * SEGMENT_BYTES, piece)
        return piece

    def sha256(self) -> str:
        """The hex digest of the whole ciphertext (the part not read yet is sealed again here)."""
        while self._hashed < self._size:
            self.read(self._hashed, min(self._size, self._hashed + 8 * SEGMENT_BYTES))
        return self._hash.hexdigest()


@dataclass(frozen=True)
class StreamedGlobal:
    payload: StreamedSeal  # the weights, sealed as they are read
    meta: bytes
    keys: dict[str, bytes]


def seal_global_streamed(
    plaintext: FramePieces | bytes | bytearray | memoryview, meta: bytes, boxes: Boxes, members: list[str]
) -> StreamedGlobal:
    """One fresh key per version seals the weights (as they are read) and the record; each
    member gets the key sealed to it."""
    key = nacl.utils.random(SecretBox.KEY_SIZE)
    sealed = {m: bytes(boxes.to(m).encrypt(key)) for m in members}
    return StreamedGlobal(StreamedSeal(plaintext, key), bytes(SecretBox(key).encrypt(meta)), sealed)


def open_streamed(ciphertext: bytes | bytearray | memoryview, version_key: bytes) -> bytearray:
    """The plaintext of a ``STREAMED`` seal, decrypted segment by segment into one buffer."""
    data = memoryview(ciphertext).cast("B")
    if len(version_key) != SecretBox.KEY_SIZE or len(data) < SEAL_HEADER_BYTES + TAG_BYTES:
        raise AuthenticationError("global version does not decrypt (tampered or wrong key)")
    header = bytes(data[:SEAL_HEADER_BYTES])
    size = int.from_bytes(header[len(GLOBAL_MAGIC) + 1 :], "big")
    if header[: len(GLOBAL_MAGIC) + 1] != GLOBAL_MAGIC + bytes((STREAMED,)) or streamed_size(size) != len(data):
        raise AuthenticationError("global version does not decrypt (not a streamed seal of its size)")
    cipher, out = _segment_cipher(version_key), bytearray(size)
    target, stride = memoryview(out), SEGMENT_BYTES + TAG_BYTES
    for i in range(segment_count(size)):
        plain = target[i * SEGMENT_BYTES : (i + 1) * SEGMENT_BYTES]
        at = SEAL_HEADER_BYTES + i * stride
        try:
            cipher.decrypt_into(segment_nonce(i), data[at : at + len(plain) + TAG_BYTES], header, plain)
        except (InvalidTag, ValueError) as e:
            raise AuthenticationError("global version does not decrypt (tampered or wrong key)") from e
    return out


def secretbox_into(payload: bytes | memoryview, key: bytes) -> bytes:
    """``SecretBox(key).encrypt(payload)`` (nonce, tag, ciphertext: the same bytes any
    ``SecretBox`` opens) written once into its output buffer. PyNaCl's own call holds three
    payload-sized copies at its peak (its output, a slice of it, the nonce joined in front):
    for a whole-model version that was three model copies in the coordinator."""
    nonce = nacl.utils.random(SecretBox.NONCE_SIZE)
    head = SecretBox.NONCE_SIZE + SecretBox.MACBYTES
    out = bytearray(head + len(payload))
    out[: SecretBox.NONCE_SIZE] = nonce
    dest = ffi.from_buffer(out)
    if lib.crypto_secretbox_easy(dest + SecretBox.NONCE_SIZE, ffi.from_buffer(payload), len(payload), nonce, key):
        raise AuthenticationError("encrypting a global version failed")
    del dest  # the buffer is exported while a cdata views it
    return out  # type: ignore[return-value]  # a bytearray: bytes-like everywhere it goes


def open_version_key(sealed_key: bytes, boxes: Boxes) -> bytes:
    try:
        return boxes.to(COORDINATOR).decrypt(sealed_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as e:
        raise AuthenticationError("the version key does not open with this member's key") from e


def open_secret(ciphertext: bytes, key: bytes) -> bytes:
    """``SecretBox(key).decrypt``, written once into the plaintext buffer (PyNaCl's call holds
    the ciphertext sliced and the plaintext twice at its peak)."""
    head = SecretBox.NONCE_SIZE + SecretBox.MACBYTES
    if len(key) != SecretBox.KEY_SIZE or len(ciphertext) < head:
        raise AuthenticationError("global version does not decrypt (tampered or wrong key)")
    out = bytearray(len(ciphertext) - head)
    source = ffi.from_buffer(ciphertext)
    nonce = bytes(ciphertext[: SecretBox.NONCE_SIZE])
    failed = lib.crypto_secretbox_open_easy(
        ffi.from_buffer(out), source + SecretBox.NONCE_SIZE, len(ciphertext) - SecretBox.NONCE_SIZE, nonce, key
    )
    del source
    if failed:
        raise AuthenticationError("global version does not decrypt (tampered or wrong key)")
    return out  # type: ignore[return-value]  # a bytearray: bytes-like everywhere it goes


def open_global(ciphertext: bytes, sealed_key: bytes, boxes: Boxes, seal: int = ONE_BOX) -> bytes:
    """Decrypt a global version with this member's sealed copy of the version key."""
    key = open_version_key(sealed_key, boxes)
    if seal == STREAMED:
        return open_streamed(ciphertext, key)  # type: ignore[return-value]  # a bytearray
    if seal != ONE_BOX:
        raise AuthenticationError(f"global version sealed as {seal!r}, which this build does not know")
    return open_secret(ciphertext, key)
