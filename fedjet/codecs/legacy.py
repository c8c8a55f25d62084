"""Readers of update envelopes recorded by earlier builds (versions 1 and 2), for replay only.

Version 1 was msgpack around a raw ``Box``; version 2 one ``SecretBox`` under the pair key.
Neither is signed, so neither proves who sent it: anyone holding the coordinator's key could
have sealed them. Headers are read as fixed layouts, never by a general parser.
"""

from __future__ import annotations

import nacl.exceptions
from nacl.secret import SecretBox

from fedjet.codecs.identity import MAX_SENDER_BYTES, Boxes, sender_name
from fedjet.errors import AuthenticationError, DecodeError


def legacy_header(envelope: bytes) -> tuple[str, int, int]:
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
    sender = sender_name(envelope[at : at + length])
    at += length
    widths = {0xC4: 1, 0xC5: 2, 0xC6: 4}
    if envelope[at : at + 3] != b"\xa2ct" or len(envelope) < at + 4 or envelope[at + 3] not in widths:
        raise DecodeError("not a fedjet update envelope (ciphertext)")
    width = widths[envelope[at + 3]]
    start = at + 4 + width
    if int.from_bytes(envelope[at + 4 : start], "big") != len(envelope) - start:
        raise DecodeError("update envelope length does not match its ciphertext")
    return sender, 1, start


def open_legacy(envelope: bytes, boxes: Boxes, sender: str, version: int, start: int) -> bytes:
    """The frame of a version-1 or version-2 envelope whose header was read up to ``start``."""
    nonce_end = start + SecretBox.NONCE_SIZE
    if len(envelope) < nonce_end + SecretBox.MACBYTES:
        raise DecodeError("update envelope is shorter than a nonce and a MAC")
    try:
        if version == 2:
            nonce, ciphertext = envelope[start:nonce_end], envelope[nonce_end:]
            return boxes.updates_with(sender).decrypt(ciphertext, nonce)
        return boxes.to(sender).decrypt(envelope[start:])
    except nacl.exceptions.CryptoError as e:
        raise AuthenticationError(f"update claiming to be from {sender!r} does not decrypt") from e
