"""A cryptographic PRG: 32-byte seeds expanded into uint32 or uint64 vectors with ChaCha20.

Every expansion is domain-separated: the ChaCha20 key is BLAKE2b of the seed together with a
purpose (``pair``, ``self``, ``indices``), the round id and a context (job, member names), so
the same secret never yields the same stream for two uses. The stream is the standard
ChaCha20 keystream (zero nonce, counter from 0) read as little-endian words, so any
implementation reproduces it, which is what replay verification relies on. Masks live in the
ring Z_{2^64} (``expand_u64``: the keystream as little-endian uint64); sparsity draws use uint32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedjet.secagg.errors import SecAggError

SEED_BYTES = 32
PURPOSES = ("pair", "self", "indices")
_PERSON = b"fedjet-secagg-v1"  # BLAKE2b personalization: at most 16 bytes
_BLOCK = 64  # ChaCha20 block size; update_into wants this much slack

Context = Sequence[str | bytes | int]


def derive_key(seed: bytes, *, purpose: str, round_id: int, context: Context = ()) -> bytes:
    """The ChaCha20 key for one use of ``seed``."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if purpose not in PURPOSES:
        raise SecAggError(f"unknown PRG purpose {purpose!r:.40}")
    label = msgpack.packb([purpose, round_id, list(context)], use_bin_type=True)
    return hashlib.blake2b(label, key=seed, digest_size=32, person=_PERSON).digest()


def _keystream(key: bytes, nbytes: int) -> bytearray:
    if nbytes < 0:
        raise SecAggError(f"a mask length must be >= 0, got {nbytes}")
    out = bytearray(nbytes + _BLOCK - 1)
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    written = encryptor.update_into(bytes(nbytes), out)  # keystream XOR zeros = keystream
    assert written == nbytes
    return out


def keystream_u32(key: bytes, n: int) -> npt.NDArray[np.uint32]:
    """The first ``n`` little-endian uint32 words of the ChaCha20 keystream under ``key``."""
    out = _keystream(key, 4 * n)
    return np.frombuffer(out, dtype="<u4", count=n).astype(np.uint32, copy=False)


def keystream_u64(key: bytes, n: int) -> npt.NDArray[np.uint64]:
    """The first ``n`` little-endian uint64 words of the ChaCha20 keystream under ``key``."""
    out = _keystream(key, 8 * n)
    return np.frombuffer(out, dtype="<u8", count=n).astype(np.uint64, copy=False)


def expand(seed: bytes, n: int, *, purpose: str, round_id: int, context: Context = ()) -> npt.NDArray[np.uint32]:
    """A uniform vector in Z_{2^32}^n (sparsity draws), deterministic in (seed, purpose, round id, context)."""
    return keystream_u32(derive_key(seed, purpose=purpose, round_id=round_id, context=context), n)


def expand_u64(seed: bytes, n: int, *, purpose: str, round_id: int, context: Context = ()) -> npt.NDArray[np.uint64]:
    """A uniform mask vector in Z_{2^64}^n, deterministic in (seed, purpose, round id, context)."""
    return keystream_u64(derive_key(seed, purpose=purpose, round_id=round_id, context=context), n)
