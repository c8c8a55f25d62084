"""Record-level DP-SGD for a ``transformers`` causal LM (Abadi et al. 2016), compute only.

Why ``torch.func`` and not Opacus: Opacus gets per-example gradients from per-layer "grad
samplers" registered for known module types (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``…).
Hugging Face's GPT-2 is built from its own ``Conv1D`` layer, which no Opacus sampler covers out
of the box (Opacus would fall back to a ``torch.func`` path for it anyway), and every further
architecture or adapter (Llama's RMSNorm and rotary embeddings, peft's LoRA wrappers) would need
the same check. Opacus also wraps the model, optimizer and data loader, while our worker keeps one
optimizer across rounds, and it is not a dependency. ``torch.func`` differentiates the model as a
pure function of its parameters (``vmap(grad(loss))`` through ``functional_call``), so any module
torch can differentiate works unchanged: tied embeddings and LoRA adapters included, because we
hand it only the trainable tensors. The cost is memory (one gradient per example in flight),
which chunking bounds.

Dropout: ``vmap`` runs with ``randomness="different"``, so each example draws its own dropout
mask exactly as in an ordinary batch; clipping bounds each example's contribution whatever the
mask, so dropout needs no special treatment.

Noise and Poisson sampling come from :class:`~fedjet.privacy.secure_random.SecureRandom`, an
AES-CTR stream under a fresh key from the OS CSPRNG for every process: nothing in the job spec
(its seed included) determines them, so a restarted worker or a second worker of the same cloud
never draws the same noise again. Floating-point attacks on the Gaussian sampler are not addressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fedjet.errors import ConfigError
from fedjet.privacy.sampling import poisson_batch
from fedjet.privacy.secure_random import SecureRandom

__all__ = ["DPSGDStep", "GradientStats", "poisson_batch", "private_gradient"]

Tensors = dict[str, torch.Tensor]
_NORM_EPS = 1e-6  # as Opacus: keeps the clip factor finite for a zero gradient


@dataclass(frozen=True)
class GradientStats:
    """What one private gradient saw; norms are per example, before and after clipping."""

    batch_size: int
    expected_batch: float
    noise_std: float  # per coordinate of the returned (averaged) gradient
    norms_before: torch.Tensor
    norms_after: torch.Tensor

    @property
    def clipped_fraction(self) -> float:
        if self.batch_size == 0:
            return 0.0
        return float((self.norms_before > self.norms_after).float().mean())


def split_parameters(model: torch.nn.Module, trainable_names: Iterable[str] | None = None) -> tuple[Tensors, Tensors]:
    """(trainable, frozen) detached tensors; trainable = requires_grad, narrowed by ``trainable_names``.

    Names are ``named_parameters`` names, where a tied weight (GPT-2's wte / lm_head) appears once;
    ``functional_call`` re-ties it, so its gradient sums both uses.
    """
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if trainable_names is not None:
        names = set(trainable_names)
        unknown = sorted(names - set(params))
        if unknown:
            raise ConfigError(f"trainable names not in the model: {unknown[:3]}")
        wanted &= names
    if not wanted:
        raise ConfigError("DP-SGD needs at least one trainable parameter")
    trainable = {n: p.detach() for n, p in params.items() if n in wanted}
    frozen = {n: p.detach() for n, p in params.items() if n not in wanted}
    return trainable, frozen


def per_example_gradients(
    model: torch.nn.Module, windows: torch.Tensor, trainable: Tensors, frozen: Tensors
) -> Tensors:
    """Gradient of each window's mean next-token loss, stacked on a leading example axis."""

    def example_loss(weights: Tensors, window: torch.Tensor) -> torch.Tensor:
        inputs, targets = window[None, :-1], window[1:]
        logits = functional_call(model, (weights, frozen), args=(), kwargs={"input_ids": inputs}).logits
        return F.cross_entropy(logits[0], targets)

    grads: Tensors = vmap(grad(example_loss), in_dims=(None, 0), randomness="different")(trainable, windows)
    return grads


def clip_per_example(grads: Tensors, clip: float) -> tuple[Tensors, torch.Tensor, torch.Tensor]:
    """Scale each example's whole gradient (all tensors jointly) to L2 norm <= ``clip``.

    Returns the clipped gradients and the per-example norms before and after.
    """
    before = _example_norms(grads)
    factor = (clip / (before + _NORM_EPS)).clamp(max=1.0)
    clipped = {n: g * factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for n, g in grads.items()}
    return clipped, before, _example_norms(clipped)


def _example_norms(grads: Tensors) -> torch.Tensor:
    per_tensor = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1).float(), dim=1) for g in grads.values()]
    norms: torch.Tensor = torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)
    return norms


def private_gradient(
    model: torch.nn.Module,
    batch_input_ids: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    randomness: SecureRandom,
    trainable_names: Iterable[str] | None = None,
    *,
    expected_batch: float,
    chunk: int = 8,
    sum_over_ranks: Callable[[Tensors], None] | None = None,
    adds_noise: bool = True,
) -> tuple[Tensors, GradientStats]:
    """The DP-SGD gradient: (Σ clipped per-example gradients + N(0, (σ·clip)²)) / (q·N).

    Dividing by the *expected* batch size, not the drawn one, keeps the batch size itself from
    leaking (as Opacus does with Poisson sampling). An empty batch yields noise alone.
    ``chunk`` examples are differentiated at once: small bounds memory on a CPU; on a GPU a
    larger chunk (32–64) amortises kernel launches and is several times faster.

    A cloud of several ranks: each rank sums its own examples' clipped gradients, one rank
    (``adds_noise``) adds the noise to its sum, and ``sum_over_ranks`` (an all-reduce) adds the
    sums in place, so the noise is drawn once for the cloud's whole batch, and every rank ends
    with the same gradient.
    """
    if not clip > 0 or noise_multiplier < 0 or not expected_batch > 0 or chunk < 1:
        raise ConfigError("need clip > 0, noise multiplier >= 0, expected batch > 0 and chunk >= 1")
    trainable, frozen = split_parameters(model, trainable_names)
    total = {n: torch.zeros_like(p) for n, p in trainable.items()}
    windows = batch_input_ids.to(next(iter(trainable.values())).device, torch.long)
    norms_before, norms_after = [], []
    for start in range(0, windows.shape[0], chunk):
        per_example = per_example_gradients(model, windows[start : start + chunk], trainable, frozen)
        clipped, before, after = clip_per_example(per_example, clip)
        for name, g in clipped.items():
            total[name] += g.sum(dim=0)
        norms_before.append(before)
        norms_after.append(after)
        del per_example, clipped
    std = noise_multiplier * clip
    if adds_noise:
        for acc in total.values():
            acc.add_(std * randomness.randn_like(acc))
    if sum_over_ranks is not None:
        sum_over_ranks(total)
    for name, acc in total.items():
        total[name] = acc / expected_batch
    stats = GradientStats(
        batch_size=int(windows.shape[0]),
        expected_batch=float(expected_batch),
        noise_std=std / expected_batch,
        norms_before=torch.cat(norms_before) if norms_before else torch.zeros(0),
        norms_after=torch.cat(norms_after) if norms_after else torch.zeros(0),
    )
    return total, stats


def apply_gradients(model: torch.nn.Module, grads: Tensors) -> None:
    """Put ``grads`` where an optimizer looks for them; other parameters get no gradient."""
    for name, param in model.named_parameters():
        param.grad = grads[name].to(param.dtype) if name in grads else None


class DPSGDStep:
    """One cloud's DP-SGD loop state: its records, Poisson sampling, and the optimizer step.

    The optimizer is the caller's (it persists across rounds); DP only changes the gradient it sees,
    and anything an optimizer does with a private gradient is post-processing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        records: np.ndarray,
        *,
        sample_rate: float,
        clip: float,
        noise_multiplier: float,
        randomness: SecureRandom | None = None,
        chunk: int = 8,
        cloud_records: int | None = None,
        sum_over_ranks: Callable[[Tensors], None] | None = None,
        adds_noise: bool = True,
    ) -> None:
        """``randomness`` defaults to a fresh CSPRNG-keyed stream (tests pass one to compare).
        On one rank of several, ``records`` are this rank's share of the cloud's
        ``cloud_records``: it samples its share at the cloud's rate, so the ranks together draw
        one Poisson batch of the cloud (see :func:`private_gradient` for the sum and the noise)."""
        if records.ndim != 2 or records.shape[0] == 0:
            raise ConfigError(f"records must be a non-empty (N, seq_len + 1) array, got shape {records.shape}")
        self.model = model
        self.optimizer = optimizer
        self.records = records
        self.sample_rate = sample_rate
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.chunk = chunk
        self.cloud_records = int(records.shape[0]) if cloud_records is None else cloud_records
        self.sum_over_ranks = sum_over_ranks
        self.adds_noise = adds_noise
        self._randomness = randomness if randomness is not None else SecureRandom()

    @property
    def expected_batch(self) -> float:
        """q·N over the cloud's records (all ranks'), the divisor of every rank's sum."""
        return self.sample_rate * self.cloud_records

    def step(self) -> GradientStats:
        """Draw a Poisson batch, take one optimizer step on its private gradient."""
        picked = poisson_batch(self._randomness, self.records.shape[0], self.sample_rate)
        batch = torch.from_numpy(self.records[picked])
        grads, stats = private_gradient(
            self.model,
            batch,
            self.clip,
            self.noise_multiplier,
            self._randomness,
            expected_batch=self.expected_batch,
            chunk=self.chunk,
            sum_over_ranks=self.sum_over_ranks,
            adds_noise=self.adds_noise,
        )
        apply_gradients(self.model, grads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats
