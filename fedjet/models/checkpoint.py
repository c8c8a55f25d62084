"""Any local ``AutoModelForCausalLM`` directory, loaded the same way on every cloud.

Loading is offline only (``local_files_only=True``): each cloud holds its own copy of the
checkpoint, and ``checkpoint_identity`` gives the hashes that prove the copies are the same
(architecture, tokenizer files, float32 weights) without moving the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from fedjet.codecs.tensors import weights_hash
from fedjet.data.hf_tokenizer import HFTokenizer, tokenizer_files
from fedjet.errors import ConfigError
from fedjet.models.build import parameter_tensors

# Keys that name where or with what a config was written, not what the model is.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def load_checkpoint(path: str | Path) -> tuple[PreTrainedModel, HFTokenizer | None]:
    """The model in float32 eval mode, and the directory's tokenizer when it holds one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: AutoModelForCausalLM cannot load it: {e}") from e
    model = model.float().eval()
    tokenizer = HFTokenizer.from_dir(path) if tokenizer_files(path) else None
    if tokenizer is not None:
        rows = model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise ConfigError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the model embeds only {rows}")
    return model, tokenizer


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of the architecture config as canonical JSON, leaving out path and library version."""
    fields = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def model_identity(model: PreTrainedModel) -> dict[str, str]:
    """Architecture and weights hashes of a loaded model (weights as float32 parameters)."""
    return {
        "model_type": str(model.config.model_type),
        "config_sha256": config_sha256(model.config.to_dict()),
        "weights_sha256": weights_hash(parameter_tensors(model)),
    }


def checkpoint_identity(path: str | Path) -> dict[str, str | None]:
    """What a cloud compares against the job spec before it trains: config, tokenizer and weights hashes."""
    model, tokenizer = load_checkpoint(path)
    return {**model_identity(model), "tokenizer_sha256": tokenizer.sha256 if tokenizer else None}
