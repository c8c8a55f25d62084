"""What a worker sends: its change since a reference point, compressed with error feedback.

The reference is the base global (sync rules and formula 4, where the coordinator rebuilds
``w_i = w_base + delta``) or the worker's state at its last send (FedBuff, which sums deltas
and must not count the same local progress twice). Gradients are fresh each time.

With reference "base", a worker that keeps training on the same base re-sends its cumulative
delta; the residual it compresses against is the one carried *into* that base, so no unsent
value is counted twice. On rebase the latest residual is carried forward.

A codec with a density warm-up compresses at the density of the base version's number: a
pure function of what the update says it was made from.
"""

from __future__ import annotations

from fedjet.codecs.feedback import compress_with_feedback
from fedjet.codecs.pipeline import CodecSpec, Compressed
from fedjet.errors import ConfigError
from fedjet.weights import Weights

REFERENCES = ("base", "last_send")


class DeltaTracker:
    def __init__(self, codec: CodecSpec, *, reference: str = "base") -> None:
        if reference not in REFERENCES:
            raise ConfigError(f"delta reference must be one of {REFERENCES}")
        self.codec = codec
        self.reference = reference
        self._ref: Weights | None = None
        self._carry: Weights | None = None  # residual carried into the current base
        self._residual: Weights | None = None  # residual after the latest send
        self._sends = 0
        self._version = 0  # the base version: sets the warm-up density

    def rebase(self, weights: Weights, version: int = 0) -> None:
        """A new global (``version``) was loaded: deltas are measured from it now."""
        self._ref = {n: t.detach().clone() for n, t in weights.items()}
        self._version = version
        if self.reference == "base":
            self._carry = self._residual

    def compress_delta(self, current: Weights) -> Compressed:
        if self._ref is None:
            raise ConfigError("compress_delta() before any global was loaded")
        delta = {n: current[n] - self._ref[n] for n in self._ref}
        if self.reference == "base":  # the carry may serve several sends on this base: keep it
            carry = None if self._carry is None else {n: t.clone() for n, t in self._carry.items()}
        else:
            carry = self._residual
        codec = self.codec.at(self._version)
        compressed, self._residual = compress_with_feedback(delta, carry, codec, seed=self._next_seed())
        if self.reference == "last_send":
            self._ref = {n: t.detach().clone() for n, t in current.items()}
        return compressed

    def compress_gradient(self, gradient: Weights) -> Compressed:
        compressed, self._residual = compress_with_feedback(
            gradient, self._residual, self.codec.at(self._version), seed=self._next_seed()
        )
        return compressed

    def _next_seed(self) -> int:
        self._sends += 1
        return self._sends
