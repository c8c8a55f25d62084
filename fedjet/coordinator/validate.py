"""Turn a decoded update into a :class:`Contribution`, or say precisely why not.

A worker holding its cloud's key can still lie in every field it sends. What the coordinator
can bound, it bounds here, purely: the claims (samples, loss, tokens) by what the job makes
plausible, the tensors by the global's names and shapes, and (:func:`clipped`) each update's
norm by the global's norm, so one cloud cannot move the global far beyond its share.
"""

from __future__ import annotations

import math

import torch

from fedjet.codecs.messages import Update, UpdateHeader
from fedjet.codecs.sparse import SparseTensor, TensorLike, shape_of, values_of
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.errors import AuthenticationError, ValidationError
from fedjet.spec import JobSpec

MAX_TRAINING_TOKENS = 1 << 40  # per cloud: ~1.1 T tokens; a sample count implying more is a lie
LOSS_FACTOR = 4.0  # a cross-entropy above 4x that of a uniform guess, log(vocab), is absurd
DEFAULT_VOCAB = 1 << 20  # when the spec names none
MIN_REFERENCE_NORM = 1.0  # clipping reference for an all-zero global
OBSERVED_FRACTION = 0.5  # of the time the coordinator itself saw an update take


def to_contribution(
    update: Update, subject_cloud: str, spec: JobSpec, update_kind: str, weights: Weights
) -> Contribution:
    h = update.header
    if h.job != spec.job:
        raise ValidationError(f"update for job {h.job!r:.40}, this is {spec.job!r}")
    if h.cloud != subject_cloud:
        raise AuthenticationError(f"update claims cloud {h.cloud!r:.40} but arrived on {subject_cloud!r}")
    if h.cloud not in spec.clouds:
        raise AuthenticationError(f"cloud {h.cloud!r:.40} is not a member of job {spec.job}")
    if h.kind != update_kind:
        raise ValidationError(f"strategy {spec.strategy.name} takes {update_kind} updates, got {h.kind}")
    check_claims(h, spec)
    expected = spec.expected_tensors(h.base_version, list(weights))  # with fragments: that round's fragment
    carried = weights if len(expected) == len(weights) else {n: weights[n] for n in expected}
    check_tensors(update.tensors, carried, dense=spec.config.codec_spec.density is None)
    tensors = {n: t.float() if isinstance(t, torch.Tensor) else t for n, t in update.tensors.items()}
    return Contribution(h.cloud, h.base_version, h.samples, h.loss, tensors)


def check_claims(h: UpdateHeader, spec: JobSpec) -> None:
    """Samples, loss and tokens within what this job makes plausible."""
    if h.samples > max_samples(spec):
        raise ValidationError(f"claims {h.samples} samples > plausible {max_samples(spec)}")
    if h.tokens > max_tokens(spec):
        raise ValidationError(f"claims {h.tokens} tokens > the most ever assigned, {max_tokens(spec)}")
    for what, loss in (("loss", h.loss), ("held-out loss", h.heldout_loss)):
        if loss is None:
            continue
        if not (math.isfinite(loss) and loss >= 0):
            raise ValidationError(f"claims {what} {loss}: a cross-entropy is finite and >= 0")
        # Under every rule, not only formula 2's: the record's mean loss must stay a number.
        if loss > max_loss(spec):
            raise ValidationError(f"claims {what} {loss} > {max_loss(spec):.2f} ({LOSS_FACTOR} x log(vocab))")


def plausible_rate(tokens: int, compute_s: float, observed_s: float) -> float | None:
    """Tokens/s for dynamic partitioning, or None when nothing can be said. The claimed compute
    time is floored at ``OBSERVED_FRACTION`` of what the coordinator saw pass since the cloud
    last had work (the base's publication or its previous update), so a cloud that claims to
    be fast is believed at most 1/OBSERVED_FRACTION times beyond what was observed."""
    seconds = max(compute_s, OBSERVED_FRACTION * observed_s)
    if tokens <= 0 or not seconds > 0:
        return None
    return tokens / seconds


def max_samples(spec: JobSpec) -> int:
    return MAX_TRAINING_TOKENS // spec.config.train.seq_len


def max_steps(spec: JobSpec) -> int:
    """The most local steps a cloud can be assigned (dynamic partitioning moves them all)."""
    steps = spec.config.train.local_steps
    return steps * len(spec.clouds) if spec.config.partition.scheme == "dynamic" else steps


def max_tokens(spec: JobSpec) -> int:
    train = spec.config.train
    return max_steps(spec) * train.batch_size * train.seq_len


def max_loss(spec: JobSpec) -> float:
    vocab = spec.model_config.get("vocab_size")
    return LOSS_FACTOR * math.log(vocab if isinstance(vocab, int) and vocab > 1 else DEFAULT_VOCAB)


def check_tensors(tensors: dict[str, TensorLike], weights: Weights, *, dense: bool) -> None:
    """Every global tensor, each with its shape and finite values; dense codecs send them whole
    (sparse entries may keep nothing)."""
    missing = sorted(set(weights) - set(tensors))
    if missing:
        raise ValidationError(f"{len(missing)} tensors missing, e.g. {missing[0]!r:.80}")
    for name, tensor in tensors.items():
        if name not in weights:
            raise ValidationError(f"unknown tensor {name!r:.80}")
        if shape_of(tensor) != tuple(weights[name].shape):
            raise ValidationError(f"{name}: shape {shape_of(tensor)} != global {tuple(weights[name].shape)}")
        if isinstance(tensor, SparseTensor):
            if dense:
                raise ValidationError(f"{name}: sparse, but the job's codec is dense")
            if not _indices_in_range(tensor, weights[name].numel()):
                raise ValidationError(f"{name}: sparse index out of range")
        if not bool(torch.isfinite(values_of(tensor)).all()):
            raise ValidationError(f"{name}: NaN or Inf values")


def norm(tensors: dict[str, TensorLike] | Weights) -> float:
    """L2 norm over every tensor, in float64 (finite float32 values never overflow it)."""
    total = 0.0
    for tensor in tensors.values():
        values = values_of(tensor) if isinstance(tensor, SparseTensor) else tensor
        total += float(torch.linalg.vector_norm(values, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_bound(weights: Weights, factor: float | None) -> float | None:
    """The largest update norm admitted: ``factor`` times the global's norm (None or 0: no
    clipping; 0 is how a job.toml, which has no null, says off)."""
    return factor * max(norm(weights), MIN_REFERENCE_NORM) if factor else None


def clipped(contribution: Contribution, bound: float | None) -> Contribution:
    """The contribution scaled down to norm ``bound`` when it is longer (None: unchanged)."""
    if bound is None:
        return contribution
    length = norm(contribution.tensors)
    if length <= bound:
        return contribution
    scale = bound / length
    tensors = {n: _scaled(t, scale) for n, t in contribution.tensors.items()}
    return Contribution(contribution.cloud, contribution.base_version, contribution.samples, contribution.loss, tensors)


def _scaled(tensor: TensorLike, scale: float) -> TensorLike:
    if isinstance(tensor, SparseTensor):
        return SparseTensor(tensor.shape, tensor.indices, tensor.values * scale)
    return tensor * scale


def _indices_in_range(tensor: SparseTensor, numel: int) -> bool:
    if not tensor.indices.numel():
        return True
    return int(tensor.indices.min()) >= 0 and int(tensor.indices.max()) < numel
