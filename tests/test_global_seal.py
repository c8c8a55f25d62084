"""The seals of global versions. The streamed seal (what is published) is made range by range
from a frame's pieces: any split of reads gives the same bytes, its digest is the whole
ciphertext's, and a flipped bit, a cut, a swapped or resized segment or a wrong key fails. The
one-box seal (runs recorded before it) is libsodium's secretbox, byte for byte, with PyNaCl."""

from __future__ import annotations

import hashlib
import itertools
import os
import platform

import numpy as np
import pytest
import torch
from nacl.secret import SecretBox

from fedjet.codecs.frame import FramePieces, frame_pieces, pack_frame
from fedjet.codecs.global_seal import (
    SEAL_HEADER_BYTES,
    SEGMENT_BYTES,
    TAG_BYTES,
    StreamedSeal,
    open_secret,
    open_streamed,
    secretbox_into,
    streamed_size,
)
from fedjet.codecs.messages import dense_entries
from fedjet.errors import AuthenticationError
from fedjet.malloc import keep_big_buffers_mapped


@pytest.mark.parametrize("size", [0, 1, 3 << 20])
def test_the_one_copy_seal_is_pynacls_secretbox_both_ways(size):
    key, payload = os.urandom(32), os.urandom(size)
    ours = secretbox_into(memoryview(payload), key)
    assert len(ours) == size + 40
    assert SecretBox(key).decrypt(bytes(ours)) == payload
    assert open_secret(SecretBox(key).encrypt(payload), key) == payload
    assert secretbox_into(payload, key)[:24] != ours[:24]  # a fresh nonce every time


def test_a_tampered_cut_or_misaddressed_version_does_not_open():
    key, payload = os.urandom(32), os.urandom(4096)
    sealed = bytes(secretbox_into(payload, key))
    flipped = bytearray(sealed)
    flipped[100] ^= 1
    for bad in (bytes(flipped), sealed[:-1], sealed[:39], b""):
        with pytest.raises(AuthenticationError):
            open_secret(bad, key)
    with pytest.raises(AuthenticationError):
        open_secret(sealed, os.urandom(32))
    with pytest.raises(AuthenticationError):
        open_secret(sealed, key[:16])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_big_buffers_are_kept_mapped_on_glibc():
    assert keep_big_buffers_mapped() is True


def test_a_frames_pieces_are_its_packed_bytes_with_the_values_left_where_they_are():
    tensors = {"a": torch.randn(300, 301), "b": torch.randn(7), "c": torch.zeros(0), "d": torch.randn(70_000)}
    header = {"job": "j", "version": 3, "hash": "h"}
    pieces = frame_pieces("global", header, dense_entries(tensors))
    assert bytes(pieces) == pack_frame("global", header, dense_entries(tensors))
    assert len(pieces._pieces) >= 5  # the two big tensors are pieces of their own, not copies
    assert any(np.shares_memory(np.asarray(p), tensors["d"].numpy()) for p in pieces._pieces)
    whole = bytes(pieces)
    for start, end in ((0, 1), (5, 70_000), (100_000, len(whole)), (len(whole) - 3, len(whole))):
        assert pieces.read(start, end) == whole[start:end]
    with pytest.raises(ValueError):
        pieces.read_into(len(whole) - 1, memoryview(bytearray(2)))


@pytest.mark.parametrize("size", [0, 1, SEGMENT_BYTES, 2 * SEGMENT_BYTES + 123])
def test_the_streamed_seal_reads_alike_in_any_ranges_and_opens_to_its_plaintext(size):
    key = os.urandom(32)
    plain = os.urandom(size)
    sealed = StreamedSeal(FramePieces([plain[: size // 3], plain[size // 3 :]]), key)
    segments = max(1, -(-size // SEGMENT_BYTES))
    assert len(sealed) == streamed_size(size) == SEAL_HEADER_BYTES + size + TAG_BYTES * segments
    whole = bytes(sealed.read(0, len(sealed)))
    assert open_streamed(whole, key) == plain
    cuts = sorted({0, len(whole), 5, 777_777 % (len(whole) + 1), (SEGMENT_BYTES + 40) % (len(whole) + 1)})
    again = StreamedSeal(FramePieces([plain]), key)
    assert b"".join(bytes(again.read(a, b)) for a, b in itertools.pairwise(cuts)) == whole
    assert again.sha256() == sealed.sha256() == hashlib.sha256(whole).hexdigest()
    unread = StreamedSeal(FramePieces([plain]), key)  # the digest of what no reader asked for yet
    assert unread.sha256() == hashlib.sha256(whole).hexdigest()
    assert bytes(StreamedSeal(plain, os.urandom(32)).read(0, len(whole))) != whole  # a fresh key, other bytes


def test_a_tampered_cut_reordered_or_resized_streamed_version_does_not_open():
    key, plain = os.urandom(32), os.urandom(2 * SEGMENT_BYTES + 10)
    whole = bytes(StreamedSeal(plain, key).read(0, streamed_size(len(plain))))
    flipped = bytearray(whole)
    flipped[SEAL_HEADER_BYTES + SEGMENT_BYTES + 100] ^= 1
    stride = SEGMENT_BYTES + TAG_BYTES
    first, second = whole[SEAL_HEADER_BYTES : SEAL_HEADER_BYTES + stride], whole[SEAL_HEADER_BYTES + stride :][:stride]
    swapped = whole[:SEAL_HEADER_BYTES] + second + first + whole[SEAL_HEADER_BYTES + 2 * stride :]
    shorter = bytearray(whole[: SEAL_HEADER_BYTES + stride])  # the first segment alone, its size rewritten
    shorter[4:SEAL_HEADER_BYTES] = SEGMENT_BYTES.to_bytes(8, "big")
    for bad in (bytes(flipped), whole[:-1], whole + b"x", swapped, bytes(shorter), whole[:SEAL_HEADER_BYTES], b""):
        with pytest.raises(AuthenticationError):
            open_streamed(bad, key)
    with pytest.raises(AuthenticationError):
        open_streamed(whole, os.urandom(32))
    with pytest.raises(AuthenticationError):
        open_streamed(whole, key[:16])
