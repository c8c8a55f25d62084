"""The privacy randomness: a key decides the stream, a fresh key is drawn per instance, and the
numbers have the distribution they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedjet.privacy.secure_random import SecureRandom


def test_a_key_decides_the_stream_and_no_key_means_a_fresh_one():
    key = bytes(range(32))
    assert np.array_equal(SecureRandom(key).normal(1000), SecureRandom(key).normal(1000))
    assert not np.array_equal(SecureRandom().normal(1000), SecureRandom().normal(1000))
    assert not np.array_equal(SecureRandom(key).normal(1000), SecureRandom(bytes(32)).normal(1000))
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(b"short")


def test_normals_are_standard_and_uniforms_uniform():
    source = SecureRandom()
    z = source.normal(200_001)  # odd: the last pair's second half is dropped
    assert z.shape == (200_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(z) > 1.96) == pytest.approx(0.05, abs=0.004)  # the tails, not just the moments
    u = source.uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx([20_000] * 10, rel=0.05)
    assert source.bernoulli(100_000, 0.03).mean() == pytest.approx(0.03, rel=0.1)


def test_noise_takes_the_tensors_shape_and_dtype():
    like = torch.zeros(3, 5, dtype=torch.bfloat16)
    noise = SecureRandom().randn_like(like)
    assert noise.shape == like.shape and noise.dtype == like.dtype and bool(noise.abs().sum() > 0)
