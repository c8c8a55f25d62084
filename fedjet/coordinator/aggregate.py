"""The aggregation algebra: pure functions over ``dict[str, Tensor]`` (paper formulas 1-4).

Every rule is written as a *pseudo-gradient* ``g`` that a server optimizer then applies
(``w <- w - lr * g`` for SGD). With SGD and lr 1 this reduces exactly to the paper's formulas:

* FedAvg (1): ``g = -sum(n_i/n * delta_i)``         so ``w <- sum(n_i/n * w_i)``
* dynamic (2): ``g = -sum(softmax(-L/T)_i * delta_i)``
* gradient (3): ``g = sum(n_i/n * grad_i)``          so ``w <- w - lr * sum(n_i/n grad_i)``
* async (4): ``g = -alpha*s(tau)*(w_i - w)``          with ``w_i = w_base + delta_i``
* FedBuff: ``g = -mean(s(tau_i) * delta_i)``          scaled by the server lr ``eta_g``

When is this the paper's formula? Exactly when the server optimizer is SGD with lr 1 and every
delta was measured from the current global ``w_t`` (a synchronous round with no carried late
update): then ``w - 1 * g`` is formula 1, 2 or 4 term by term. Any other server lr, momentum,
Adam, or a stale base generalizes it (DiLoCo's outer Nesterov, FedAdam, FedAsync).

Sums run in the order given (the coordinator passes JetStream sequence order), so the same
inputs always give bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedjet.codecs.sparse import TensorLike, add_scaled_
from fedjet.config.job import Staleness
from fedjet.errors import AggregationError, ConfigError
from fedjet.weights import Weights

__all__ = [
    "Contribution",
    "RunningSum",
    "Staleness",
    "Weights",
    "async_mix",
    "dynamic",
    "fedavg",
    "fedbuff",
    "gradient",
]


@dataclass(frozen=True)
class Contribution:
    """One validated update as the math sees it."""

    cloud: str
    base_version: int
    samples: int
    loss: float
    tensors: dict[str, TensorLike]  # a delta (w_i - w_base) or a gradient; missing names are zero


def zeros_like(weights: Weights) -> Weights:
    return {n: torch.zeros_like(t) for n, t in weights.items()}


def combine(template: Weights, parts: Sequence[Contribution], coefs: Sequence[float]) -> Weights:
    """``sum_i coefs[i] * parts[i].tensors``, in order, as dense tensors shaped like ``template``,
    for the tensors some part carries (a fragment round's parts carry one fragment: the sum, and
    the memory it takes, stay that fragment's)."""
    if len(parts) != len(coefs):
        raise AggregationError("one coefficient per contribution")
    present = {name for part in parts for name in part.tensors}
    acc = {n: torch.zeros_like(t) for n, t in template.items() if n in present}
    for part, coef in zip(parts, coefs, strict=True):
        for name, tensor in part.tensors.items():
            add_scaled_(acc[name], tensor, coef)
    return acc


def sample_weights(parts: Sequence[Contribution]) -> list[float]:
    """n_i / n (formula 1); equal weights if every cloud reports zero samples."""
    total = sum(p.samples for p in parts)
    if total <= 0:
        return [1.0 / len(parts)] * len(parts)
    return [p.samples / total for p in parts]


def loss_weights(parts: Sequence[Contribution], temperature: float = 1.0) -> list[float]:
    """softmax(-L_i / T) (formula 2), computed stably."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    logits = [-p.loss / temperature for p in parts]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _discounted(weights: list[float], discount: Sequence[float] | None) -> list[float]:
    """Multiply each weight by s(tau_i); a stale update carried into a sync round counts less."""
    if discount is None:
        return weights
    return [w * d for w, d in zip(weights, discount, strict=True)]


def fedavg(template: Weights, parts: Sequence[Contribution], discount: Sequence[float] | None = None) -> Weights:
    return _negated(combine(template, parts, _discounted(sample_weights(parts), discount)))


def dynamic(
    template: Weights,
    parts: Sequence[Contribution],
    temperature: float = 1.0,
    discount: Sequence[float] | None = None,
) -> Weights:
    return _negated(combine(template, parts, _discounted(loss_weights(parts, temperature), discount)))


def gradient(template: Weights, parts: Sequence[Contribution], discount: Sequence[float] | None = None) -> Weights:
    return combine(template, parts, _discounted(sample_weights(parts), discount))


def async_mix(current: Weights, base: Weights, part: Contribution, alpha: float, staleness: float) -> Weights:
    """Pseudo-gradient of formula 4: ``-alpha*s*(w_base + delta - w)``."""
    scale = alpha * staleness
    out = {}
    for name, w in current.items():
        g = base[name] - w
        if name in part.tensors:
            add_scaled_(g, part.tensors[name], 1.0)
        out[name] = g.mul_(-scale)
    return out


def fedbuff(template: Weights, parts: Sequence[Contribution], staleness: Sequence[float]) -> Weights:
    """``-mean(s(tau_i) * delta_i)``; the server lr plays eta_g."""
    return _negated(combine(template, parts, [s / len(parts) for s in staleness]))


class RunningSum:
    """FedAvg folded one update at a time: ``sum(n_i * s(tau_i) * delta_i)`` as updates come,
    divided by ``sum(n_i)`` once the round closes. A round then holds one accumulator the size
    of what its updates carry (a fragment), not every update until it closes. Its rounding
    differs from :func:`fedavg`'s (which normalises the weights first), so the record of a
    version says which of the two made it, and replay folds it the same way."""

    def __init__(self, template: Weights) -> None:
        self._template = template
        self.acc: Weights = {}
        self.samples = 0
        self.count = 0

    def add(self, part: Contribution, discount: float = 1.0) -> None:
        if part.samples <= 0:
            raise AggregationError(f"{part.cloud}'s update claims no samples: a running sum weighs by samples")
        for name, tensor in part.tensors.items():
            if name not in self.acc:
                self.acc[name] = torch.zeros_like(self._template[name])
            add_scaled_(self.acc[name], tensor, part.samples * discount)
        self.samples += part.samples
        self.count += 1

    def fedavg(self) -> Weights:
        """The pseudo-gradient ``-sum(n_i s_i delta_i) / sum(n_i)``, written over the sum."""
        if not self.count:
            raise AggregationError("an empty round makes no version")
        scale = -1.0 / self.samples
        for tensor in self.acc.values():
            tensor.mul_(scale)
        out, self.acc = self.acc, {}
        return out


def _negated(weights: Weights) -> Weights:
    for tensor in weights.values():
        tensor.neg_()
    return weights
