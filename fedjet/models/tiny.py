"""Small real Hugging Face checkpoints built offline: a BPE tokenizer trained on WikiText, a tiny GPT-2, a tiny Llama.

The tests and the README's "own model and data" runs build the same files with these functions;
``python -m fedjet.models.tiny --wikitext DIR --out DIR`` writes the checkpoints plus three
clouds' private data in three formats and a held-out folder. Everything is seeded: the same call
gives byte-identical tokenizer files and identical weights.
"""

from __future__ import annotations

import os

# The hub is switched off before transformers is imported: tests never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedjet.data.wikitext import load_directory

EOS = "<|endoftext|>"


def train_bpe_tokenizer(data_dir: Path, *, articles: int = 10, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the first WikiText articles, EOS as its only special token."""
    texts = [a.text for a in load_directory(data_dir).train[:articles]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS)


def save_tiny_gpt2(
    out: Path, tokenizer: PreTrainedTokenizerFast, *, n_embd: int = 32, n_layer: int = 2, seed: int = 0
) -> Path:
    """A GPT-2 (tied embeddings, Conv1D projections) with the tokenizer saved beside it."""
    config = GPT2Config(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        n_positions=64,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(out, tokenizer, lambda: GPT2LMHeadModel(config), seed)


# hidden, MLP width, layers, attention heads, key/value heads, positions
LLAMA_SHAPES = {
    "tiny": (32, 64, 2, 2, 2, 64),
    # TinyLlama's shape with one layer more: about 1.02 B parameters with a 2,000-token vocabulary
    # (the GPU check: 3 workers on one GPU, --fragments 8; see docs/fragments.md).
    "1b": (2048, 5632, 23, 32, 4, 2048),
}


def llama_config(size: str, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    hidden, intermediate, layers, heads, kv_heads, positions = LLAMA_SHAPES[size]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_llama(out: Path, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, size: str = "tiny") -> Path:
    """A Llama-architecture model (untied embeddings, RoPE, SwiGLU) with the tokenizer beside it."""
    config = llama_config(size, tokenizer)
    return _save(out, tokenizer, lambda: LlamaForCausalLM(config), seed)


def _save(out: Path, tokenizer: PreTrainedTokenizerFast, build, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_checkpoints(root: Path, data_dir: Path) -> dict[str, Path]:
    """``{"gpt2": DIR, "llama": DIR}`` sharing one trained tokenizer, under ``root``."""
    tokenizer = train_bpe_tokenizer(data_dir)
    return {
        "gpt2": save_tiny_gpt2(root / "gpt2", tokenizer),
        "llama": save_tiny_llama(root / "llama", tokenizer),
    }


def write_cloud_data(data_dir: Path, out: Path) -> dict[str, Path]:
    """Three clouds, three formats (.txt files, one .jsonl, a WikiText folder) and held-out .md files."""
    import json

    corpus = load_directory(data_dir)
    third = len(corpus.train) // 3
    folders = {name: out / name for name in ("aws", "gcp", "azure", "eval")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=False)
    for i, article in enumerate(corpus.train[:third]):
        (folders["aws"] / f"doc{i:03d}.txt").write_text(article.text, encoding="utf-8")
    with (folders["gcp"] / "notes.jsonl").open("w", encoding="utf-8") as fh:
        for article in corpus.train[third : 2 * third]:
            fh.write(json.dumps({"text": article.text}) + "\n")
    azure = "".join(a.text for a in corpus.train[2 * third :])
    (folders["azure"] / "wiki.valid.tokens").write_text(azure, encoding="utf-8")
    for i, article in enumerate(corpus.eval[:10]):
        (folders["eval"] / f"eval{i:02d}.md").write_text(article.text, encoding="utf-8")
    return folders


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="tiny GPT-2 and Llama checkpoints and three clouds' data")
    parser.add_argument("--wikitext", required=True, type=Path, help="a WikiText-2 folder")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gpt2-width", type=int, default=128)
    parser.add_argument("--llama-size", choices=sorted(LLAMA_SHAPES), default="tiny")
    args = parser.parse_args(argv)
    tokenizer = train_bpe_tokenizer(args.wikitext, articles=30, vocab_size=2000)
    print(save_tiny_gpt2(args.out / "gpt2", tokenizer, n_embd=args.gpt2_width, n_layer=4))
    print(save_tiny_llama(args.out / "llama", tokenizer, size=args.llama_size))
    for name, folder in write_cloud_data(args.wikitext, args.out / "clouds").items():
        print(name, folder)


if __name__ == "__main__":
    main()
