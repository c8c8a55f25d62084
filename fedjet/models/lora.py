"""LoRA adapters with ``peft``: the only tensors that train, and the only ones that travel.

``--peft lora:r=8,alpha=16,dropout=0.05[,targets=NAME,NAME]`` freezes the base model and adds a
low-rank update ``W + (alpha / r) · B·A`` to the target modules. Every cloud and the coordinator
call ``apply_lora`` with the job's seed, so they all build the same initial A (random) and B
(zeros) without sending them; after that, updates and global versions carry only A and B.

Averaging A and B separately is not averaging the updates they make. FedAvg over adapters
computes ``mean(B)·mean(A)``, while the average of the clouds' low-rank updates is
``mean(B·A)``; the two differ by the cross terms ``mean((B_i − B̄)(A_i − Ā))``. We choose to
average A and B separately, as FedIT and most federated LoRA systems do: the exchange stays
cheap (r·(d_in + d_out) numbers per module instead of d_in·d_out), every strategy and codec
applies unchanged, and the error is second order in how far the clouds drift apart: it vanishes
when they start each round from the same A and B and move little per round (few local steps, a
modest learning rate). Exact alternatives (sending the products, or freezing A as FFA-LoRA
does) cost either the dense update's bytes or half the adapter's capacity.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedjet.config.peft import LoraSpec
from fedjet.errors import ConfigError, ValidationError
from fedjet.models.build import seeded

# Used when peft's own table is unavailable; the same choices as peft makes (query and value projections).
FALLBACK_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
}


def default_targets(model_type: str) -> tuple[str, ...]:
    """peft's per-architecture defaults (attention query/value projections), else ours."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        mapping = {}
    found = mapping.get(model_type) or FALLBACK_TARGETS.get(model_type)
    if not found:
        raise ConfigError(f"--peft: no default LoRA targets for model type {model_type!r}; give targets=NAME,NAME")
    return tuple(found)


def apply_lora(model: PreTrainedModel, spec: LoraSpec, *, seed: int) -> PeftModel:
    """Wrap ``model`` (in place) with fresh adapters, initialised identically for a given seed.

    Call it on the CPU model before moving it to a device: peft draws A from the CPU generator.
    """
    targets = spec.targets or default_targets(str(model.config.model_type))
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft annotates int; scaling is alpha / r
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        fan_in_fan_out=_uses_conv1d(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with seeded(seed):
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise ConfigError(f"--peft {spec.describe()}: {e}") from e


def _uses_conv1d(model: torch.nn.Module, targets: tuple[str, ...]) -> bool:
    """GPT-2 stores its projections transposed (``Conv1D``); peft must be told."""
    return any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, module in model.named_modules()
    )


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters under names without the adapter name (as peft's saved adapters name them)."""
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter if isinstance(adapter, str) else "default"
    return {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters() if p.requires_grad}


def exchanged_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors an update and a global version carry: trainable only, float32, CPU."""
    return {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in trainable_parameters(model).items()}


def load_exchanged(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into ``model``, refusing any missing, extra or misshapen name."""
    params = trainable_parameters(model)
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise ValidationError(f"adapter tensors do not match the model: missing {missing}, extra {extra}")
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValidationError(f"{name}: shape {tuple(value.shape)} != adapter {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))


def merge_and_unload(model: PeftModel) -> PreTrainedModel:
    """A plain model with ``W + (alpha / r)·B·A`` folded in; ``model`` itself keeps its adapters."""
    merged = copy.deepcopy(model).merge_and_unload()
    return merged.float().eval()
