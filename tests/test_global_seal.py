"""The one-copy seal of global versions is libsodium's secretbox, byte for byte: what it seals
PyNaCl opens, what PyNaCl seals it opens, and a flipped bit, a cut or a wrong key fails."""

from __future__ import annotations

import os
import platform

import pytest
from nacl.secret import SecretBox

from fedjet.codecs.global_seal import open_secret, secretbox_into
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
