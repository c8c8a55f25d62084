"""Who a party is: its secret keys, its peers' public keys and the pair keys derived from them.

Every envelope of fedjet (updates, secure-aggregation steps, global versions) takes its keys
from :class:`Boxes`, each domain under a BLAKE2b personalisation of its own, so a message of one
domain never opens as another. Pure: keys come in as objects; files live in ``fedjet.keystore``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import nacl.encoding
import nacl.exceptions
import nacl.hash
from nacl.public import Box, PrivateKey, PublicKey
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from fedjet.errors import AuthenticationError, DecodeError, SchemaError

COORDINATOR = "coordinator"
MAX_SENDER_BYTES = 64
_UPDATE_PERSON = b"fedjet-update-v2"  # BLAKE2b personalisation: the update key's domain
_SECAGG_PERSON = b"fedjet-secagg-v1"  # the secure-aggregation messages' domain
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


def sender_bytes(name: str) -> bytes:
    """A sender's name as an envelope header carries it; a name no reader would take is refused."""
    sender = name.encode()
    if not _SENDER.fullmatch(sender):
        raise SchemaError(f"sender name {name!r:.40} must match [A-Za-z0-9_-]{{1,64}}")
    return sender


def sender_name(raw: bytes) -> str:
    """A sender's name read from an envelope header: refused unless it is a valid name."""
    if not _SENDER.fullmatch(raw):
        raise DecodeError("envelope sender is not a valid name")
    return raw.decode()


def sign(body: bytes, me: Identity) -> bytes:
    return bytes(me.sign.sign(body))


def verify(signed: bytes, signer: PublicIdentity) -> bytes:
    try:
        return signer.verify.verify(signed)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
        raise AuthenticationError(f"signature by {signer.name} does not verify") from e


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
