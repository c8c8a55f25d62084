"""The model wrapper: a GPT-2-architecture causal LM from ``transformers``.

Three ways in, all offline: a named small preset (``tiny``), a local checkpoint directory
(``from_pretrained(PATH)``), or the config dict that the coordinator publishes in the job spec
(workers build the architecture from it, then load the global weights they are sent).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers.utils import logging as hf_logging

from fedjet.errors import ConfigError, ValidationError
from fedjet.models.presets import PRESETS

# No progress bar while loading a checkpoint: it is noise in a service's log, and its tqdm lock is
# a semaphore that every process which loaded one left behind at exit (a warning at shutdown).
hf_logging.disable_progress_bar()


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when available, else CPU; ``requested`` overrides."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preset_config(name: str, vocab_size: int, eos_id: int) -> GPT2Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or a path")
    return GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **PRESETS[name],
    )


def initial_model(name_or_path: str, *, vocab_size: int, eos_id: int, seed: int) -> PreTrainedModel:
    """The model every run starts from: a seeded preset or a local pretrained checkpoint."""
    if name_or_path in PRESETS:
        with seeded(seed):
            model = GPT2LMHeadModel(preset_config(name_or_path, vocab_size, eos_id))
    else:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model {name_or_path}: neither a preset {sorted(PRESETS)} "
                "nor a local checkpoint directory with config.json"
            )
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"checkpoint vocabulary {model.config.vocab_size} < tokenizer's {vocab_size}")
    return model.float().eval()


def config_dict(model: PreTrainedModel) -> dict[str, Any]:
    """What workers need to rebuild the architecture (no weights)."""
    return model.config.to_dict()


def model_from_config(config: dict[str, Any]) -> PreTrainedModel:
    try:
        fields = dict(config)
        model_type = fields.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"job spec holds an unusable model config: {e}") from e
    return AutoModelForCausalLM.from_config(hf_config).float()


def parameter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters as float32 CPU tensors (tied weights appear once)."""
    return {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.named_parameters()}


def load_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model, refusing any name or shape mismatch."""
    params = dict(model.named_parameters())
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise ValidationError(f"global weights do not match the model: missing {missing}, extra {extra}")
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValidationError(f"{name}: shape {tuple(value.shape)} != model {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator under ``seed``, leaving the caller's stream untouched:
    every party builds the same initial weights from the job's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def quiet_transformers() -> None:
    """Silence hub chatter: fedjet never downloads models at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
