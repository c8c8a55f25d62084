"""The model wrapper: presets, local checkpoints (save_pretrained -> from_pretrained), training."""

from __future__ import annotations

import pytest
import torch

from fedjet.config.job import TrainConfig
from fedjet.data.batches import BatchSampler, encode_articles, eval_windows
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.data.wikitext import load_directory
from fedjet.errors import ConfigError, ValidationError
from fedjet.models.build import (
    config_dict,
    initial_model,
    load_parameters,
    model_from_config,
    parameter_tensors,
)
from fedjet.models.job_model import JobModel
from fedjet.worker.train import LocalTrainer, evaluate


def test_tiny_preset_is_about_one_to_two_million_parameters():
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    count = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= count <= 2_000_000


def test_same_seed_same_weights_and_config_rebuilds_architecture():
    a = initial_model("tiny", vocab_size=257, eos_id=256, seed=5)
    b = initial_model("tiny", vocab_size=257, eos_id=256, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    rebuilt = model_from_config(config_dict(a))
    load_parameters(rebuilt, parameter_tensors(a))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), rebuilt.parameters(), strict=True))


def test_local_checkpoint_loads_with_from_pretrained(tmp_path):
    source = initial_model("tiny", vocab_size=257, eos_id=256, seed=2)
    source.save_pretrained(tmp_path / "ckpt")
    loaded = initial_model(str(tmp_path / "ckpt"), vocab_size=257, eos_id=256, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(source.parameters(), loaded.parameters(), strict=True))
    with pytest.raises(ConfigError):
        initial_model(str(tmp_path / "missing"), vocab_size=257, eos_id=256, seed=0)


def test_loading_mismatched_weights_is_refused():
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    weights = parameter_tensors(model)
    name = next(iter(weights))
    with pytest.raises(ValidationError):
        load_parameters(model, {**weights, name: torch.zeros(3)})
    with pytest.raises(ValidationError):
        load_parameters(model, {k: v for k, v in weights.items() if k != name})


def test_local_training_lowers_loss_on_wikitext(data_dir):
    corpus = load_directory(data_dir)
    tok = ByteTokenizer()
    tokens = encode_articles(corpus.train[:5], tok)
    settings = TrainConfig(local_steps=15, batch_size=4, seq_len=64, lr=3e-3)
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    windows = eval_windows(encode_articles(corpus.eval[:3], tok), 64, 2048)
    before = evaluate(model, windows, torch.device("cpu"))
    trainer = LocalTrainer(JobModel(model, tok), BatchSampler(tokens, 64, 4, seed=0), settings, torch.device("cpu"))
    result = trainer.train(settings.local_steps)
    after = evaluate(trainer.model, windows, torch.device("cpu"))
    assert result.sequences == 60 and result.tokens == 60 * 64
    assert after.loss < before.loss - 0.5
    grads, _ = trainer.gradient(2)
    assert set(grads) == set(parameter_tensors(model)) and any(g.abs().sum() > 0 for g in grads.values())
