"""Global versions, coordinator to members: encrypted once with a fresh ``SecretBox`` key per
version; that key is sealed to every member with ``Box(coordinator_secret, member_public)``.
The head that carries the sealed keys is signed by the coordinator (:mod:`fedjet.channel`)."""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.utils
from nacl._sodium import ffi, lib  # type: ignore[import-not-found]  # libsodium, as PyNaCl binds it
from nacl.secret import SecretBox

from fedjet.codecs.identity import COORDINATOR, Boxes
from fedjet.errors import AuthenticationError


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


def open_global(ciphertext: bytes, sealed_key: bytes, boxes: Boxes) -> bytes:
    """Decrypt a global version with this member's sealed copy of the version key."""
    return open_secret(ciphertext, open_version_key(sealed_key, boxes))
