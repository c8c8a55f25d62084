"""Global versions, coordinator to members: encrypted once with a fresh ``SecretBox`` key per
version; that key is sealed to every member with ``Box(coordinator_secret, member_public)``.
The head that carries the sealed keys is signed by the coordinator (:mod:`fedjet.channel`)."""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.utils
from nacl.secret import SecretBox

from fedjet.codecs.identity import COORDINATOR, Boxes
from fedjet.errors import AuthenticationError


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
