"""Randomness that protects privacy: an AES-256-CTR keystream, keyed from the OS CSPRNG.

Why not ``torch.Generator`` or numpy: their state follows from a seed, and a seed that anything
in the job spec determines lets whoever holds the spec regenerate every noise draw and every
Poisson batch, which makes the mechanism deterministic (ε = ∞). Here a stream is a key: a fresh
``os.urandom(32)`` by default (DP-SGD: one per process, never recorded), or a key the caller
keeps secret and records sealed to whoever may replay it (central DP: one per version).

AES-CTR under a random key is a cryptographically secure generator; uniforms take 53 bits of
it and Gaussians come from the Box–Muller transform in float64, rounded to the tensor's dtype.
Floating-point attacks on the Gaussian sampler (Mironov 2012) are not addressed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
_CHUNK = 1 << 20  # values generated at a time: bounds the float64 scratch memory
_TWO_PI = 2.0 * math.pi
_SCALE_53 = 1.0 / (1 << 53)


class SecureRandom:
    """A deterministic stream of uniforms and Gaussians for one secret 32-byte key."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secure-random key is {KEY_BYTES} bytes, got {len(key)}")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def _words(self, count: int) -> np.ndarray:
        raw = self._stream.update(bytes(8 * count))
        return np.frombuffer(raw, dtype="<u8")

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 uniforms in [0, 1), 53 random bits each."""
        return (self._words(count) >> np.uint64(11)).astype(np.float64) * _SCALE_53

    def _open_uniform(self, count: int) -> np.ndarray:
        """Uniforms in (0, 1]: safe under ``log``."""
        return ((self._words(count) >> np.uint64(11)).astype(np.float64) + 1.0) * _SCALE_53

    def normal(self, count: int) -> np.ndarray:
        """``count`` float64 standard normals (Box–Muller, both outputs of each pair used)."""
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            pairs = (n + 1) // 2
            radius = np.sqrt(-2.0 * np.log(self._open_uniform(pairs)))
            angle = _TWO_PI * self.uniform(pairs)
            both = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
            out[start : start + n] = both[:n]
        return out

    def randn_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of ``tensor``'s shape, dtype and device."""
        noise = torch.from_numpy(self.normal(tensor.numel())).reshape(tensor.shape)
        return noise.to(device=tensor.device, dtype=tensor.dtype)

    def bernoulli(self, count: int, probability: float) -> np.ndarray:
        """``count`` independent draws, True with ``probability`` (Poisson sampling)."""
        return self.uniform(count) < probability
