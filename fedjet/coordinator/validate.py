"""Turn a decoded update into a :class:`Contribution`, or say precisely why not."""

from __future__ import annotations

import torch

from fedjet.codecs.messages import Update
from fedjet.codecs.sparse import SparseTensor, shape_of, values_of
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.errors import AuthenticationError, ValidationError
from fedjet.spec import JobSpec


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
    for name, tensor in update.tensors.items():
        if name not in weights:
            raise ValidationError(f"unknown tensor {name!r:.80}")
        if shape_of(tensor) != tuple(weights[name].shape):
            raise ValidationError(f"{name}: shape {shape_of(tensor)} != global {tuple(weights[name].shape)}")
        if isinstance(tensor, SparseTensor) and not _indices_in_range(tensor, weights[name].numel()):
            raise ValidationError(f"{name}: sparse index out of range")
        if not bool(torch.isfinite(values_of(tensor)).all()):
            raise ValidationError(f"{name}: NaN or Inf values")
    tensors = {n: t.float() if isinstance(t, torch.Tensor) else t for n, t in update.tensors.items()}
    return Contribution(h.cloud, h.base_version, h.samples, h.loss, tensors)


def _indices_in_range(tensor: SparseTensor, numel: int) -> bool:
    if not tensor.indices.numel():
        return True
    return int(tensor.indices.min()) >= 0 and int(tensor.indices.max()) < numel
