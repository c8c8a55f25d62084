"""What a worker sends: its change since a reference point.

The reference is the base global (sync rules and formula 4, where the coordinator rebuilds
``w_i = w_base + delta``) or the worker's state at its last send (FedBuff, which sums deltas
and must not count the same local progress twice).
"""

from __future__ import annotations

import torch

from fedjet.codecs.pipeline import CodecSpec
from fedjet.errors import ConfigError

Weights = dict[str, torch.Tensor]
REFERENCES = ("base", "last_send")


class DeltaTracker:
    def __init__(self, codec: CodecSpec, *, reference: str = "base") -> None:
        if reference not in REFERENCES:
            raise ConfigError(f"delta reference must be one of {REFERENCES}")
        self.codec = codec
        self.reference = reference
        self._ref: Weights | None = None

    def rebase(self, weights: Weights) -> None:
        """A new global was loaded: deltas are measured from it now."""
        self._ref = {n: t.detach().clone() for n, t in weights.items()}

    def delta(self, current: Weights) -> Weights:
        if self._ref is None:
            raise ConfigError("delta() before any global was loaded")
        out = {n: current[n] - self._ref[n] for n in self._ref}
        if self.reference == "last_send":
            self._ref = {n: t.detach().clone() for n, t in current.items()}
        return out
