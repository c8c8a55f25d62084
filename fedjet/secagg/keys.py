"""Per-round key material and the primitives over it: agreement, commitments, masks, share boxes.

Every round a member draws fresh X25519 pairs (``c`` to encrypt shares, ``s`` to agree on
pairwise masks) and a fresh self-mask seed ``b``; nothing is reused, so a share or key from
an earlier round is useless in a later one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped]
import nacl.bindings
import nacl.exceptions
import nacl.utils
import numpy as np
import numpy.typing as npt
from nacl.public import Box, PrivateKey, PublicKey

from fedjet.secagg.errors import SecAggAuthError, ShareError, StaleShareError
from fedjet.secagg.prg import SEED_BYTES, expand_u64
from fedjet.secagg.shamir import Share

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True, kw_only=True)
class RoundSecrets:
    """A member's secrets for one round; never leave the member except as Shamir shares."""

    c_sk: bytes
    s_sk: bytes
    b: bytes

    @classmethod
    def generate(cls) -> RoundSecrets:
        return cls(
            c_sk=bytes(PrivateKey.generate()),
            s_sk=bytes(PrivateKey.generate()),
            b=nacl.utils.random(SEED_BYTES),
        )


def public_key(secret: bytes) -> bytes:
    return bytes(nacl.bindings.crypto_scalarmult_base(secret))


def agree(secret: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret; a low-order peer key (all-zero result) is refused."""
    try:
        return bytes(nacl.bindings.crypto_scalarmult(secret, peer_public))
    except (nacl.exceptions.CryptoError, RuntimeError, ValueError, TypeError) as e:
        raise SecAggAuthError("unusable X25519 public key (low order?)") from e


def commit(b: bytes, *, job: str, round_id: int, member: str) -> bytes:
    """The hash a member publishes for its self-mask seed, checked after reconstruction."""
    body = msgpack.packb(["fedjet-secagg-b", job, round_id, member, b], use_bin_type=True)
    return hashlib.sha256(body).digest()


def sign_of(u: str, v: str) -> int:
    """+1 if ``u`` adds the pair mask (u sorts before v), -1 if it subtracts it."""
    return 1 if u < v else -1


def pair_mask(secret: bytes, peer_public: bytes, n: int, *, job: str, round_id: int, u: str, v: str) -> U64:
    """PRG(s_uv) for the unordered pair {u, v}; both ends (and the unmasker) get the same vector."""
    lo, hi = sorted((u, v))
    return expand_u64(agree(secret, peer_public), n, purpose="pair", round_id=round_id, context=(job, lo, hi))


def self_mask(b: bytes, n: int, *, job: str, round_id: int, member: str) -> U64:
    return expand_u64(b, n, purpose="self", round_id=round_id, context=(job, member))


def seal_share(box: Box, *, job: str, round_id: int, sender: str, recipient: str, s: Share, b: Share) -> bytes:
    """Encrypt one recipient's pair of shares; the Box authenticates, the body binds the round."""
    body = msgpack.packb([job, round_id, sender, recipient, s.to_bytes(), b.to_bytes()], use_bin_type=True)
    return bytes(box.encrypt(body))


def open_share(
    box: Box, ciphertext: bytes, *, job: str, round_id: int, sender: str, recipient: str
) -> tuple[Share, Share]:
    """The (s_sk share, b share) in a ciphertext, or a ``ShareError`` if anything is off."""
    try:
        body = msgpack.unpackb(box.decrypt(ciphertext), raw=False, max_bin_len=1024, max_str_len=1024)
    except (nacl.exceptions.CryptoError, msgpack.UnpackException, ValueError, TypeError) as e:
        raise ShareError(f"share from {sender!r:.40} does not decrypt (tampered or from another round)") from e
    if not (isinstance(body, list) and len(body) == 6):
        raise ShareError(f"share from {sender!r:.40} is malformed")
    if body[0] != job or body[1] != round_id:
        raise StaleShareError(f"share from {sender!r:.40} belongs to job {body[0]!r:.40} round {body[1]!r:.20}")
    if body[2] != sender or body[3] != recipient:
        raise ShareError(f"share from {sender!r:.40} was addressed as {body[2]!r:.40} -> {body[3]!r:.40}")
    if not (isinstance(body[4], bytes) and isinstance(body[5], bytes)):
        raise ShareError(f"share from {sender!r:.40} is malformed")
    return Share.from_bytes(body[4]), Share.from_bytes(body[5])


def make_box(secret: bytes, peer_public: bytes) -> Box:
    try:
        return Box(PrivateKey(secret), PublicKey(peer_public))
    except (nacl.exceptions.CryptoError, RuntimeError, ValueError, TypeError) as e:
        raise SecAggAuthError("unusable X25519 public key for share encryption") from e
