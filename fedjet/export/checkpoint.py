"""A global version as a standard checkpoint: ``from_pretrained`` loads it with no fedjet installed.

The directory holds safetensors weights, ``config.json``, the tokenizer files and a small
``fedjet.json`` (job, version, weights hash, strategy, codec, anything else the caller records,
such as a privacy budget). Tokenizer files are copied byte for byte, so the export's tokenizer
hash is the job's. A model trained with the byte tokenizer gets an equivalent ``transformers``
tokenizer (bytes 0..255, EOS 256), so ``AutoTokenizer`` loads every export.

With LoRA the directory holds the adapter (``peft.PeftModel.from_pretrained(base, DIR)`` loads
it); with ``merge=True`` it holds the merged full model instead, and the adapter goes to
``DIR/adapter`` (an ``adapter_config.json`` beside ``config.json`` would make ``transformers``
try to load the adapter onto a base model it cannot find).

Everything is written into a sibling staging directory first and renamed into place, so an
interrupted export never leaves a half checkpoint under the requested name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

import fedjet
from fedjet.codecs.tensors import weights_hash
from fedjet.config.peft import LoraSpec, parse_peft
from fedjet.data.hf_tokenizer import byte_level_hf_tokenizer, tokenizer_files, tokenizer_files_sha256
from fedjet.errors import ConfigError, ValidationError
from fedjet.models.build import load_parameters, model_from_config, parameter_tensors
from fedjet.models.checkpoint import load_checkpoint
from fedjet.models.lora import apply_lora, exchanged_tensors, load_exchanged, merge_and_unload

INFO_FILE = "fedjet.json"
ADAPTER_SUBDIR = "adapter"


def write_checkpoint(
    out_dir: str | Path,
    model_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    tokenizer_source: str | Path | None,
    info: dict[str, Any],
    *,
    peft_spec: LoraSpec | str | None = None,
    adapter_weights: dict[str, torch.Tensor] | None = None,
    base_model_dir: str | Path | None = None,
    merge: bool = False,
    overwrite: bool = False,
) -> str:
    """Write the checkpoint and return the hash of the exported tensors (equal to ``weights_hash`` of the input).

    Full fine-tuning: ``weights`` are the version's parameters. LoRA (``peft_spec`` given):
    ``adapter_weights`` are the version's adapter tensors and the base comes from
    ``base_model_dir`` or, without it, from ``model_config`` + ``weights``. ``tokenizer_source``
    is a directory holding tokenizer files, ``"bytes"`` for the byte tokenizer, or ``None``.
    """
    out = Path(out_dir)
    _check_target(out, overwrite)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if peft_spec is None:
            record = _write_full(staging, model_config, weights)
        else:
            spec = parse_peft(peft_spec) if isinstance(peft_spec, str) else peft_spec
            base = _lora_base(model_config, weights, base_model_dir)
            record = _write_lora(staging, base, spec, adapter_weights, merge)
        record["tokenizer"] = _write_tokenizer(staging, tokenizer_source, merge and peft_spec is not None)
        _write_info(staging, {**info, **record})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(record["weights_sha256"])


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty directory or, with ``overwrite``, an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if any(out.iterdir()) and not (overwrite and (out / INFO_FILE).is_file()):
        why = "is not an earlier fedjet export" if overwrite else "is not empty (pass overwrite to replace an export)"
        raise ConfigError(f"--out {out}: {why}")


def _write_full(staging: Path, model_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = model_from_config(model_config)
    load_parameters(model, weights)
    written = _save_model(model, staging)
    expected = weights_hash(weights)
    if written != expected:
        raise ValidationError(f"exported weights hash {written[:16]}… != version's {expected[:16]}… (not float32?)")
    return {"weights_sha256": written, "model_type": str(model.config.model_type), "peft": None, "merged": False}


def _save_model(model: PreTrainedModel, directory: Path) -> str:
    """safetensors weights and config (tied weights stored once); the hash of what was saved."""
    model = model.float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return weights_hash(parameter_tensors(model))


def _lora_base(
    model_config: dict[str, Any], weights: dict[str, torch.Tensor], base_model_dir: str | Path | None
) -> PreTrainedModel:
    if base_model_dir is not None:
        return load_checkpoint(base_model_dir)[0]
    if not weights:
        raise ConfigError("LoRA export needs the base model: base_model_dir or its config and weights")
    base = model_from_config(model_config)
    load_parameters(base, weights)
    return base.eval()


def _write_lora(
    staging: Path,
    base: PreTrainedModel,
    spec: LoraSpec,
    adapter_weights: dict[str, torch.Tensor] | None,
    merge: bool,
) -> dict[str, Any]:
    if not adapter_weights:
        raise ConfigError("LoRA export needs the version's adapter tensors")
    base_hash = weights_hash(parameter_tensors(base))
    model = apply_lora(base, spec, seed=0)  # initial values are overwritten just below
    load_exchanged(model, adapter_weights)
    written = weights_hash(exchanged_tensors(model))
    if written != weights_hash(adapter_weights):
        raise ValidationError("exported adapter hash differs from the version's (adapter tensors not float32?)")
    record: dict[str, Any] = {
        "weights_sha256": written,
        "base_weights_sha256": base_hash,
        "model_type": str(base.config.model_type),
        "peft": spec.describe(),
        "merged": merge,
    }
    if merge:
        record["merged_weights_sha256"] = _save_model(merge_and_unload(model), staging)
        model.save_pretrained(str(staging / ADAPTER_SUBDIR))
    else:
        model.save_pretrained(str(staging))
    return record


def _write_tokenizer(staging: Path, source: str | Path | None, also_in_adapter: bool) -> dict[str, str] | None:
    """Copy a checkpoint's tokenizer files byte for byte, or write the byte tokenizer's equivalent."""
    if source is None:
        return None
    targets = [staging, staging / ADAPTER_SUBDIR] if also_in_adapter else [staging]
    if str(source) == "bytes":
        tokenizer = byte_level_hf_tokenizer()
        for target in targets:
            tokenizer.save_pretrained(target)
        return {"kind": "bytes", "sha256": tokenizer_files_sha256(staging)}
    files = tokenizer_files(source)
    if not files:
        raise ConfigError(f"{source}: no tokenizer files to export")
    for target in targets:
        for file in files:
            shutil.copyfile(file, target / file.name)
    return {"kind": "hf", "sha256": tokenizer_files_sha256(source)}


def _write_info(staging: Path, record: dict[str, Any]) -> None:
    try:
        text = json.dumps({"format": 1, "fedjet_version": fedjet.__version__, **record}, indent=2, sort_keys=True)
    except TypeError as e:
        raise ConfigError(f"export info is not JSON-serializable: {e}") from e
    (staging / INFO_FILE).write_text(text + "\n", encoding="utf-8")
