"""Server optimizers over the aggregated pseudo-gradient (SGD, Nesterov as in DiLoCo, Adam as in
FedAdam). Pure and deterministic; the state is plain tensors so it can be checkpointed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedjet.config.job import ServerOptConfig
from fedjet.weights import Weights

__all__ = ["Saved", "ServerOptConfig", "ServerOptimizer"]


@dataclass(frozen=True)
class Saved:
    """The optimizer before a step, as far as that step can change it."""

    steps: int
    names: frozenset[str]
    state: dict[str, dict[str, torch.Tensor]]


class ServerOptimizer:
    """``step(w, g)`` returns new weights; ``w`` is not modified."""

    def __init__(self, config: ServerOptConfig) -> None:
        self.config = config
        self.steps = 0
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def step(self, weights: Weights, pseudo_grad: Weights, *, consume: bool = False) -> Weights:
        """A tensor the pseudo-gradient does not name (another fragment's) is kept as it is, the
        same tensor, and so is its optimizer state. ``consume``: plain SGD writes the new weights
        over the pseudo-gradient (the caller's to give up): one tensor fewer at the step's peak,
        and the same bits as ``w - lr * g`` (``(-lr) * g + w`` rounds alike)."""
        self.steps += 1
        c = self.config
        out: Weights = {}
        for name, w in weights.items():
            g = pseudo_grad.get(name)
            if g is None:
                out[name] = w
                continue
            if c.name == "sgd" and consume:
                out[name] = g.mul_(-c.step_size).add_(w)
                continue
            if c.name == "sgd":
                direction = g
            elif c.name == "nesterov":
                buf = self._buffer(name, "momentum", w)
                buf.mul_(c.momentum).add_(g)
                direction = g + c.momentum * buf
            else:
                direction = self._adam(name, w, g)
            out[name] = w - c.step_size * direction
        return out

    def saved(self, pseudo_grad: Weights) -> Saved:
        """What a :meth:`step` on ``pseudo_grad`` may change: the step count and the state of
        the tensors it names (a fragment's, not the whole model's), for :meth:`restore`."""
        state = {n: {k: v.clone() for k, v in self.state[n].items()} for n in pseudo_grad if n in self.state}
        return Saved(self.steps, frozenset(pseudo_grad), state)

    def restore(self, saved: Saved) -> None:
        """Undo a step: the state it changed comes back, the state it created goes."""
        self.steps = saved.steps
        for name in saved.names:
            if name in saved.state:
                self.state[name] = saved.state[name]
            else:
                self.state.pop(name, None)

    def _adam(self, name: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        c = self.config
        m = self._buffer(name, "m", w).mul_(c.beta1).add_(g, alpha=1 - c.beta1)
        v = self._buffer(name, "v", w).mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
        m_hat = m / (1 - c.beta1**self.steps)
        v_hat = v / (1 - c.beta2**self.steps)
        return m_hat / (v_hat.sqrt() + c.eps)

    def _buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        slot = self.state.setdefault(name, {})
        if key not in slot:
            slot[key] = torch.zeros_like(like)
        return slot[key]
