"""Typed errors of secure aggregation, under the project's one error tree.

A rejected secure-aggregation message becomes data like any other codec rejection: the
services count it by ``reason`` (the class name) and keep going. ``SecAggAbort`` is the one
that ends a round: too few members are left to reconstruct, so nothing is applied.
"""

from __future__ import annotations

from fedjet.errors import AuthenticationError, CodecError, ReplayError, SchemaError, ValidationError


class SecAggError(CodecError):
    """Base of everything secure aggregation rejects."""


class SecAggAbort(SecAggError):
    """Fewer than ``threshold`` members are left at some stage: the round ends, nothing is applied."""

    def __init__(self, stage: str, have: int, threshold: int) -> None:
        super().__init__(f"secure aggregation aborted at {stage}: {have} member(s) < threshold {threshold}")
        self.stage = stage
        self.have = have
        self.threshold = threshold


class SecAggSchemaError(SecAggError, SchemaError):
    """A secure-aggregation message is missing fields, has mistyped ones, or an unknown version."""


class SecAggProtocolError(SecAggError):
    """A well-formed message that does not fit the round: wrong phase, unknown or duplicate sender."""


class SecAggAuthError(SecAggError, AuthenticationError):
    """A signature does not verify, or a public key is unusable (low order)."""


class StaleRoundError(SecAggError, ReplayError):
    """A message carries another round's id (replayed from an earlier round, or early)."""


class ShareError(SecAggError):
    """A Shamir share is missing, duplicated, tampered with, or inconsistent with its commitment."""


class StaleShareError(ShareError, StaleRoundError):
    """A share-carrying message from another round: shares are never reused across rounds."""


class RevealRefused(SecAggError):
    """A member was asked to reveal what would unmask one member's input (both its b and its s_sk)."""


class EncodingError(SecAggError, ValidationError):
    """A value cannot be encoded in fixed point (not finite) or a ring vector has the wrong shape."""


class OutOfRangeError(SecAggError, ValidationError):
    """The unmasked sum lies outside what the survivors' clipped, weighted inputs can add up to:
    some member sent a contribution that no clipped input encodes. Nothing is applied."""
