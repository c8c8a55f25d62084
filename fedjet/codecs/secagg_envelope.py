"""The secure-aggregation envelope: one protocol step between a member and the coordinator.

Sealed with the pair's secure-aggregation key (a BLAKE2b domain of its own), so a protocol
message never opens as an update or the other way round."""

from __future__ import annotations

from collections.abc import Collection

import nacl.exceptions
from nacl.secret import SecretBox

from fedjet.codecs.identity import MAX_SENDER_BYTES, Boxes, sender_bytes, sender_name
from fedjet.errors import AuthenticationError, DecodeError, LimitError

SECAGG_MAGIC = b"FJS"
SECAGG_VERSION = 1


def seal_secagg(payload: bytes, boxes: Boxes, to: str) -> bytes:
    """A secure-aggregation step from ``boxes.me`` to ``to`` (either side), behind a fixed header."""
    sender = sender_bytes(boxes.me.name)
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
    sender = sender_name(envelope[5:end])
    if sender not in senders:
        raise AuthenticationError(f"secure-aggregation message from {sender!r}, which is not in this round")
    try:
        return sender, boxes.secagg_with(sender).decrypt(envelope[end:])
    except nacl.exceptions.CryptoError as e:
        raise AuthenticationError(f"secure-aggregation message claiming to be from {sender!r} does not decrypt") from e
