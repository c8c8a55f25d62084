"""Shamir secret sharing of 32-byte secrets over GF(2^521 - 1).

A secret below 2^256 is the constant term of a random polynomial of degree ``threshold - 1``;
share ``x`` is the polynomial at ``x``. Any ``threshold`` shares give the secret back, fewer
reveal nothing. ``combine`` interpolates from the first ``threshold`` shares and checks that
every further share lies on the same polynomial, so a tampered share among more than
``threshold`` is caught here; the protocol additionally checks the result against a
commitment (the public key for ``s_sk``, a hash for ``b``), which catches the rest.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedjet.secagg.errors import ShareError

PRIME = 2**521 - 1  # a Mersenne prime: far above any 256-bit secret
SECRET_BYTES = 32
_Y_BYTES = 66
_X_BYTES = 4
SHARE_BYTES = _X_BYTES + _Y_BYTES
MAX_SHARE_ID = 2**32 - 1


@dataclass(frozen=True, kw_only=True)
class Share:
    """One point ``(x, y)`` of a sharing polynomial; ``x`` is the holder's id, never 0."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_SHARE_ID:
            raise ShareError(f"share id {self.x} outside [1, {MAX_SHARE_ID}]")
        if not 0 <= self.y < PRIME:
            raise ShareError("share value outside the field")

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ShareError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        return cls(x=int.from_bytes(data[:_X_BYTES], "big"), y=int.from_bytes(data[_X_BYTES:], "big"))


def split(secret: bytes, threshold: int, share_ids: Iterable[int]) -> dict[int, Share]:
    """One share per id; any ``threshold`` of them reconstruct ``secret``."""
    ids = list(share_ids)
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(ids)) != len(ids):
        raise ShareError("share ids must be distinct")
    if not 1 <= threshold <= len(ids):
        raise ShareError(f"threshold {threshold} outside [1, {len(ids)}]")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in ids:
        if not 1 <= x <= MAX_SHARE_ID:
            raise ShareError(f"share id {x} outside [1, {MAX_SHARE_ID}]")
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = Share(x=x, y=y)
    return shares


def _newton(xs: Sequence[int], ys: Sequence[int]) -> list[int]:
    """Newton divided-difference coefficients of the polynomial through the points."""
    coefficients = list(ys)
    for j in range(1, len(xs)):
        for i in range(len(xs) - 1, j - 1, -1):
            step = pow(xs[i] - xs[i - j], -1, PRIME)
            coefficients[i] = (coefficients[i] - coefficients[i - 1]) * step % PRIME
    return coefficients


def _evaluate(xs: Sequence[int], coefficients: Sequence[int], at: int) -> int:
    value = 0
    for x, c in zip(reversed(xs), reversed(coefficients), strict=True):
        value = (value * (at - x) + c) % PRIME
    return value


def combine(shares: Iterable[Share], threshold: int) -> bytes:
    """The secret behind at least ``threshold`` consistent shares with distinct ids."""
    points = list(shares)
    if threshold < 1 or len(points) < threshold:
        raise ShareError(f"{len(points)} share(s) cannot reconstruct a secret of threshold {threshold}")
    xs = [p.x for p in points]
    if len(set(xs)) != len(xs):
        raise ShareError("duplicate share ids")
    base_x, base_y = xs[:threshold], [p.y for p in points[:threshold]]
    coefficients = _newton(base_x, base_y)
    for extra in points[threshold:]:
        if _evaluate(base_x, coefficients, extra.x) != extra.y:
            raise ShareError(f"share {extra.x} is inconsistent with the others (tampered?)")
    secret = _evaluate(base_x, coefficients, 0)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("reconstructed value is not a 32-byte secret (tampered share?)")
    return secret.to_bytes(SECRET_BYTES, "big")
