"""``fedjet generate``: a sample from an exported checkpoint, so a person sees the model work."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from transformers import GenerationMixin

from fedjet.data.tokenizer import ByteTokenizer
from fedjet.errors import ConfigError
from fedjet.models.checkpoint import load_checkpoint


def generate_text(
    model_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 40,
    seed: int = 0,
    *,
    temperature: float = 0.0,
) -> str:
    """The prompt and its continuation; greedy at ``temperature=0``, else sampled under ``seed``.

    A checkpoint without tokenizer files falls back to the byte tokenizer it was trained with.
    The prompt is cut from the left so prompt and continuation fit the model's context.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    model, tokenizer = load_checkpoint(model_dir)
    encoder = tokenizer if tokenizer is not None else ByteTokenizer()
    context = _context_length(model)
    max_new_tokens = min(max_new_tokens, context - 1)
    ids = encoder.encode(prompt, eos=False)[-(context - max_new_tokens) :]
    if len(ids) == 0:
        ids = encoder.encode("", eos=True)  # an empty prompt starts a new document
    inputs = torch.as_tensor(ids, dtype=torch.long).unsqueeze(0)
    sampled = temperature > 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        output = cast(GenerationMixin, model).generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=sampled,
            temperature=temperature if sampled else None,
            top_k=None,
            top_p=None,
            eos_token_id=encoder.eos_id,
            pad_token_id=encoder.eos_id,
        )
    new = output[0, inputs.shape[1] :].tolist()
    if tokenizer is not None:
        return prompt + tokenizer.decode(new, skip_special_tokens=True)
    return prompt + ByteTokenizer().decode(new)


def _context_length(model: torch.nn.Module) -> int:
    config = model.config  # type: ignore[union-attr]
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return 1024
