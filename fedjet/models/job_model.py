"""The job's model as every party builds it, and the tensors that travel.

Base weights come from a preset (built under the job's seed, so every party builds the same
version 0 without moving it) or from a local checkpoint directory (each cloud its own copy,
identified by hashes in the spec). With ``--peft lora:...`` the base is frozen, adapters are
added under the job's seed, and only the adapters are exchanged; otherwise every parameter is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from fedjet.codecs.fragments import plan_fragments
from fedjet.codecs.tensors import weights_hash
from fedjet.config.job import JobConfig
from fedjet.config.strategy_traits import traits_of
from fedjet.data.batches import Tokenizer
from fedjet.data.hf_tokenizer import HFTokenizer, check_tokenizer
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.errors import ConfigError
from fedjet.models.build import (
    PRESETS,
    load_parameters,
    model_from_config,
    parameter_tensors,
    preset_config,
    quiet_transformers,
    seeded,
)
from fedjet.models.checkpoint import config_sha256, load_checkpoint
from fedjet.models.lora import (
    LoraSpec,
    apply_lora,
    exchanged_tensors,
    load_exchanged,
    trainable_parameters,
)
from fedjet.models.presets import validate_model_source
from fedjet.spec import JobSpec
from fedjet.weights import Weights


@dataclass
class JobModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    lora: LoraSpec | None = None
    base_hash: str = ""  # the frozen base's weights hash (LoRA jobs)

    def exchanged(self) -> Weights:
        """What updates and global versions carry: adapters (LoRA) or every parameter."""
        return exchanged_tensors(self.model) if self.lora else parameter_tensors(self.model)

    def load(self, tensors: Weights) -> None:
        if self.lora:
            load_exchanged(self.model, tensors)
        else:
            load_parameters(self.model, tensors)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters under their exchanged names (gradients travel under them too)."""
        if self.lora:
            return trainable_parameters(self.model)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def initial_job_model(job: JobConfig) -> JobModel:
    """The coordinator's version 0: a seeded preset or its local checkpoint, with adapters."""
    quiet_transformers()
    validate_model_source(job)
    if job.model in PRESETS:
        with seeded(job.seed):
            model: PreTrainedModel = model_from_config(preset_config(job.model, 257, 256).to_dict())
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        model, hf = load_checkpoint(job.model)
        tokenizer = hf or ByteTokenizer()
    return _with_adapters(model, tokenizer, job)


def spec_for(job: JobConfig, jm: JobModel) -> JobSpec:
    """The spec the coordinator signs: the config, the architecture, the tokenizer's identity."""
    strategy = traits_of(job.strategy.name)
    sha = jm.tokenizer.sha256 if isinstance(jm.tokenizer, HFTokenizer) else ""
    config = jm.model.get_base_model().config if jm.lora else jm.model.config  # type: ignore[operator]
    extra: dict[str, object] = {}
    if job.train.fragments > 1:  # stated in the spec, so every party agrees on the fragments
        sizes = {n: t.numel() for n, t in jm.exchanged().items()}
        extra["fragments"] = plan_fragments(sizes, job.train.fragments).to_wire()
    return JobSpec(
        config=job,
        model_config=config.to_dict(),
        tokenizer=getattr(jm.tokenizer, "name", "bytes"),
        tokenizer_sha256=sha,
        base_hash=jm.base_hash,
        synchronous=strategy.synchronous,
        update_kind=strategy.update_kind,
        delta_reference=strategy.delta_reference,
        extra=extra,
    )


def job_model_for(spec: JobSpec, model_path: str | None = None) -> JobModel:
    """A worker's, the observer's or an exporter's model for ``spec``. With ``model_path`` (this
    party's copy of the checkpoint) version 0 need not be downloaded; without one a preset is
    rebuilt from the seed, and a checkpoint job starts from random weights until version 0
    arrives (its tokenizer and, for LoRA, its frozen base must be local)."""
    quiet_transformers()
    job = spec.config
    if model_path is not None:
        model, hf = load_checkpoint(model_path)
        _check_architecture(spec, model, model_path)
        tokenizer: Tokenizer = hf or ByteTokenizer()
        if spec.tokenizer_sha256:
            check_tokenizer(model_path, spec.tokenizer_sha256)
    elif job.model in PRESETS:
        with seeded(job.seed):
            model = model_from_config(spec.model_config)
        tokenizer = ByteTokenizer()
    else:
        if spec.tokenizer_sha256:
            raise ConfigError(
                f"job {job.job} uses the tokenizer of its checkpoint ({spec.tokenizer}); give --model PATH, "
                "this cloud's copy of the checkpoint"
            )
        model, tokenizer = model_from_config(spec.model_config), ByteTokenizer()
    jm = _with_adapters(model, tokenizer, job)
    if jm.lora and jm.base_hash != spec.base_hash:
        raise ConfigError(
            f"--peft trains adapters on a frozen base, and this base (weights {jm.base_hash[:16]}…) is not the job's "
            f"({spec.base_hash[:16]}…): give --model PATH with the same checkpoint as the coordinator"
        )
    return jm


def _with_adapters(model: PreTrainedModel, tokenizer: Tokenizer, job: JobConfig) -> JobModel:
    lora = job.peft_spec
    if lora is None:
        return JobModel(model.float(), tokenizer)
    base_hash = weights_hash(parameter_tensors(model))
    return JobModel(apply_lora(model.float(), lora, seed=job.seed), tokenizer, lora, base_hash)


def _check_architecture(spec: JobSpec, model: PreTrainedModel, path: str) -> None:
    if config_sha256(model.config.to_dict()) != config_sha256(spec.model_config):
        raise ConfigError(f"--model {path}: its architecture (config.json) is not the job's")


def preset_base_weights(spec: JobSpec) -> Weights:
    """The frozen base of a LoRA job on a preset, rebuilt from the seed (no checkpoint needed)."""
    if spec.config.model not in PRESETS:
        raise ConfigError(f"job {spec.job} fine-tunes a checkpoint: give --model PATH (its base)")
    with seeded(spec.config.seed):
        return parameter_tensors(model_from_config(spec.model_config))
