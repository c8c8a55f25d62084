"""DP-SGD on real tiny transformers models: clipping, sums, noise, LoRA, and a short private run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from fedjet.data.batches import encode_articles, eval_windows
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.data.wikitext import load_directory
from fedjet.errors import ConfigError
from fedjet.privacy.accounting import calibrate_noise, epsilon_for
from fedjet.privacy.dpsgd import (
    DPSGDStep,
    clip_per_example,
    per_example_gradients,
    private_gradient,
    split_parameters,
)
from fedjet.privacy.sampling import record_windows, sample_rate_for
from fedjet.privacy.secure_random import SecureRandom
from fedjet.worker.train import evaluate, lm_loss

SEQ = 16


def tiny_gpt2(dropout: float = 0.0) -> PreTrainedModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=257, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=256, eos_token_id=256,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=256, eos_token_id=256,
    )  # fmt: skip
    return LlamaForCausalLM(config)


MODELS: dict[str, Callable[[], PreTrainedModel]] = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def windows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def autograd_gradients(model: torch.nn.Module, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Ordinary autograd, one example at a time: the reference for the vmap path."""
    found = []
    for row in batch:
        model.zero_grad(set_to_none=True)
        loss, _, _ = lm_loss(model, row[None])
        loss.backward()
        found.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_per_example_gradient_is_clipped_and_small_ones_are_untouched(name: str):
    model = MODELS[name]().eval()
    batch = windows(8)
    trainable, frozen = split_parameters(model)
    raw = per_example_gradients(model, batch, trainable, frozen)
    raw_norms = torch.stack([g.reshape(8, -1).norm(dim=1) for g in raw.values()]).norm(dim=0)
    clip = float(raw_norms.median())  # about half the examples get clipped
    clipped, before, after = clip_per_example(raw, clip)
    torch.testing.assert_close(before, raw_norms)
    assert torch.all(after <= clip + 1e-5)
    small = raw_norms < clip
    assert 0 < int(small.sum()) < 8
    for n in raw:
        assert torch.equal(clipped[n][small], raw[n][small])
    big = ~small
    torch.testing.assert_close(after[big], torch.full_like(after[big], clip), atol=1e-5, rtol=0)

    _, stats = private_gradient(model, batch, clip, 0.0, SecureRandom(), expected_batch=8.0, chunk=3)
    assert stats.batch_size == 8 and torch.all(stats.norms_after <= clip + 1e-5)
    torch.testing.assert_close(stats.norms_before, raw_norms, atol=1e-5, rtol=1e-5)
    assert 0 < stats.clipped_fraction < 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unclipped_noiseless_sum_equals_autograd_one_example_at_a_time(name: str):
    model = MODELS[name]().eval()
    batch = windows(5, seed=1)
    grads, stats = private_gradient(model, batch, 1e6, 0.0, SecureRandom(), expected_batch=1.0, chunk=2)
    reference = autograd_gradients(model, batch)
    assert set(grads) == set(reference[0]) == {n for n, _ in model.named_parameters()}
    for n, g in grads.items():
        torch.testing.assert_close(g, sum(r[n] for r in reference), atol=1e-5, rtol=1e-5)
    assert torch.equal(stats.norms_before, stats.norms_after)


def test_tied_embedding_gets_the_gradient_of_both_uses():
    model = tiny_gpt2().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    grads, _ = private_gradient(model, windows(3), 1e6, 0.0, SecureRandom(), expected_batch=1.0)
    assert "lm_head.weight" not in grads
    reference = autograd_gradients(model, windows(3))
    wte = sum(r["transformer.wte.weight"] for r in reference)
    torch.testing.assert_close(grads["transformer.wte.weight"], wte, atol=1e-5, rtol=1e-5)


def test_noise_has_std_sigma_times_clip_over_expected_batch():
    model = tiny_gpt2().eval()
    batch, clip, sigma, expected = windows(4), 0.5, 1.3, 3.0
    exact, _ = private_gradient(model, batch, clip, 0.0, SecureRandom(), expected_batch=expected)
    noisy, stats = private_gradient(model, batch, clip, sigma, SecureRandom(bytes([7]) * 32), expected_batch=expected)
    target = sigma * clip / expected
    assert stats.noise_std == pytest.approx(target)
    noise = (noisy["transformer.wte.weight"] - exact["transformer.wte.weight"]).ravel()  # 257 x 32 coordinates
    assert float(noise.std()) == pytest.approx(target, rel=0.05)
    assert abs(float(noise.mean())) < 4 * target / noise.numel() ** 0.5
    every = torch.cat([(noisy[n] - exact[n]).ravel() for n in exact])
    assert float(every.std()) == pytest.approx(target, rel=0.05)


def test_an_empty_batch_gives_noise_alone():
    model = tiny_gpt2().eval()
    empty = torch.zeros((0, SEQ + 1), dtype=torch.long)
    grads, stats = private_gradient(model, empty, 1.0, 2.0, SecureRandom(bytes([1]) * 32), expected_batch=4.0)
    assert stats.batch_size == 0 and stats.norms_before.numel() == 0 and stats.clipped_fraction == 0.0
    assert float(grads["transformer.wte.weight"].std()) == pytest.approx(0.5, rel=0.05)
    silent, _ = private_gradient(model, empty, 1.0, 0.0, SecureRandom(), expected_batch=4.0)
    assert all(float(g.abs().max()) == 0.0 for g in silent.values())


def test_dropout_in_train_mode_draws_its_own_mask_per_example():
    model = tiny_gpt2(dropout=0.1).train()
    batch = windows(1).repeat(4, 1)  # four copies of one window
    grads, stats = private_gradient(model, batch, 0.05, 0.0, SecureRandom(), expected_batch=4.0)
    assert torch.all(stats.norms_after <= 0.05 + 1e-5)
    assert len(set(stats.norms_before.tolist())) == 4  # different masks, different gradients
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_lora_adapters_are_the_only_parameters_that_get_gradients():
    import peft

    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads, _ = private_gradient(model, windows(4), 1.0, 0.5, SecureRandom(), expected_batch=4.0)
    assert set(grads) == adapters
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = DPSGDStep(model, optimizer, windows(40).numpy(), sample_rate=0.2, clip=1.0, noise_multiplier=0.5)
    step.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in adapters), n


def test_trainable_names_must_exist():
    with pytest.raises(ConfigError, match="not in the model"):
        split_parameters(tiny_gpt2(), ["no.such.weight"])


def test_dp_sgd_at_epsilon_8_lowers_held_out_loss(data_dir: Path):
    torch.manual_seed(0)
    corpus, tokenizer, seq, steps, delta = load_directory(data_dir), ByteTokenizer(), 32, 30, 1e-5
    records = record_windows(encode_articles(corpus.train[:5], tokenizer), seq)
    held_out = eval_windows(encode_articles(corpus.eval[:3], tokenizer), seq, 64 * seq)
    q = sample_rate_for(32, len(records))
    sigma = calibrate_noise(8.0, q, steps, delta)
    assert 7.9 <= epsilon_for(sigma, q, steps, delta) <= 8.0
    model = tiny_gpt2()
    initial = evaluate(model, held_out, torch.device("cpu")).loss
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = DPSGDStep(model, optimizer, records, sample_rate=q, clip=1.0, noise_multiplier=sigma)
    sizes = [step.step().batch_size for _ in range(steps)]
    final = evaluate(model, held_out, torch.device("cpu")).loss
    print(f"dp-sgd eps=8: sigma={sigma:.3f} q={q:.4f} N={len(records)} loss {initial:.3f} -> {final:.3f}")
    assert len(set(sizes)) > 1  # Poisson batches vary in size
    assert np.isfinite(final) and final < initial - 1.0
