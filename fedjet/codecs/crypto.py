"""End-to-end protection that does not trust the broker (PyNaCl).

* Updates: ``Box(worker_secret, coordinator_public)`` - authenticated public-key encryption,
  so only the coordinator can read an update and it knows which cloud's key sealed it.
* Global versions: encrypted once with a fresh ``SecretBox`` key per version; that key is
  sealed to every member with ``Box(coordinator_secret, member_public)``; the head that
  carries the sealed keys and the ciphertext digest is signed with the coordinator's
  ``SigningKey``. Workers verify the signature before they trust anything in it.
* Anti-replay: per (cloud, worker) sequence numbers must strictly increase.

Pure: keys come in as objects, bytes go out; files live in ``fedjet.keystore``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import nacl.exceptions
import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from fedjet.codecs.frame import field as read
from fedjet.errors import AuthenticationError, DecodeError, LimitError, ReplayError, SchemaError

ENVELOPE_VERSION = 1
COORDINATOR = "coordinator"


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


def _unpack_map(data: bytes, max_bytes: int, what: str) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise LimitError(f"{what} of {len(data)} bytes > limit {max_bytes}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=1 << 12)
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
        raise DecodeError(f"{what} is not msgpack: {type(e).__name__}") from e
    if not isinstance(raw, dict):
        raise DecodeError(f"{what} must be a map")
    return raw


# --- updates: worker -> coordinator --------------------------------------------------------


def seal_update(frame: bytes, boxes: Boxes) -> bytes:
    """Encrypt a frame from ``boxes.me`` (a cloud) to the coordinator."""
    ciphertext = boxes.to(COORDINATOR).encrypt(frame)
    envelope: bytes = msgpack.packb(
        {"ev": ENVELOPE_VERSION, "from": boxes.me.name, "ct": bytes(ciphertext)}, use_bin_type=True
    )
    return envelope


def open_update(envelope: bytes, boxes: Boxes, max_bytes: int) -> tuple[str, bytes]:
    """(sender, frame) of a sealed update; anything not sealed by a known cloud is rejected."""
    raw = _unpack_map(envelope, max_bytes, "update envelope")
    if raw.get("ev") != ENVELOPE_VERSION:
        raise SchemaError(f"unknown envelope version {raw.get('ev')!r:.20}")
    sender = read(raw, "from", str)
    ciphertext = read(raw, "ct", bytes)
    try:
        return sender, boxes.to(sender).decrypt(ciphertext)
    except nacl.exceptions.CryptoError as e:
        raise AuthenticationError(f"update claiming to be from {sender!r:.40} does not decrypt") from e


@dataclass
class ReplayGuard:
    """Per (cloud, worker) sequence numbers must strictly increase."""

    last: dict[str, int] = field(default_factory=dict)

    def check(self, cloud: str, worker: str, seq: int) -> None:
        key = f"{cloud}/{worker}"
        previous = self.last.get(key)
        if previous is not None and seq <= previous:
            raise ReplayError(f"{key} sequence {seq} <= last accepted {previous}")
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
