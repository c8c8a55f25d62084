"""Real local checkpoints (BPE tokenizer, tiny GPT-2, tiny Llama): load, identify, pack, export, LoRA, generate."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedjet.codecs.tensors import weights_hash
from fedjet.config.peft import LoraSpec, parse_peft
from fedjet.data.batches import BatchSampler
from fedjet.data.hf_tokenizer import HFTokenizer, check_tokenizer, load_tokenizer, tokenizer_files_sha256
from fedjet.data.packing import pack_documents
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.errors import ConfigError, ValidationError
from fedjet.export.checkpoint import write_checkpoint
from fedjet.models.build import config_dict, initial_model, parameter_tensors
from fedjet.models.checkpoint import checkpoint_identity, load_checkpoint
from fedjet.models.generate import generate_text
from fedjet.models.lora import apply_lora, default_targets, exchanged_tensors, load_exchanged, merge_and_unload
from fedjet.models.tiny import EOS, build_checkpoints, llama_config, save_tiny_gpt2, train_bpe_tokenizer

INFO = {"job": "j1", "version": 3, "strategy": "fedavg", "codec": "dense", "privacy": {"epsilon": 8.0}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, data_dir):
    return build_checkpoints(tmp_path_factory.mktemp("ckpts"), data_dir)


@pytest.fixture(scope="module")
def wide_gpt2(tmp_path_factory, ckpts):
    """A GPT-2 wide enough (n_embd=128) that rank-4 adapters are a small fraction of it."""
    tokenizer = AutoTokenizer.from_pretrained(ckpts["gpt2"], local_files_only=True)
    return save_tiny_gpt2(tmp_path_factory.mktemp("wide") / "gpt2", tokenizer, n_embd=128)


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _nonzero_adapters(model, seed: int) -> None:
    """Adapters as if trained (B starts at zero, which would make every merge trivially exact)."""
    gen = torch.Generator().manual_seed(seed)
    load_exchanged(model, {n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in exchanged_tensors(model).items()})


def test_the_1b_llama_shape_has_a_billion_parameters_and_its_fragments_are_even(ckpts):
    """The GPU check's model, counted without memory (meta device): at least 10^9 parameters,
    and eight fragments along its modules each within a fifth of an eighth of it."""
    from transformers import LlamaForCausalLM

    from fedjet.codecs.fragments import plan_fragments

    tokenizer = AutoTokenizer.from_pretrained(ckpts["llama"], local_files_only=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config("1b", tokenizer))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    assert 1.0e9 <= total < 1.1e9
    plan = plan_fragments(sizes, 8)
    assert all(abs(sum(sizes[n] for n in f) - total / 8) < total / 40 for f in plan.fragments)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_any_local_causal_lm_loads_in_float32_with_its_own_tokenizer(ckpts, arch):
    model, tokenizer = load_checkpoint(ckpts[arch])
    assert model.config.model_type == arch and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == 400 and tokenizer.decode([tokenizer.eos_id]) == EOS
    assert tokenizer.name.startswith("hf:")
    assert _logits(model).shape == (2, 16, 400)


def test_tokenizer_hash_is_stable_and_a_modified_tokenizer_is_refused(ckpts, data_dir, tmp_path):
    sha = tokenizer_files_sha256(ckpts["gpt2"])
    assert sha == tokenizer_files_sha256(ckpts["llama"])
    train_bpe_tokenizer(data_dir).save_pretrained(tmp_path / "again")
    assert tokenizer_files_sha256(tmp_path / "again") == sha  # training is deterministic
    assert check_tokenizer(ckpts["gpt2"], sha) == sha
    train_bpe_tokenizer(data_dir, vocab_size=380).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="differs from the job's"):
        check_tokenizer(tmp_path / "other", sha)
    with pytest.raises(ConfigError, match="no tokenizer files"):
        tokenizer_files_sha256(tmp_path)


def test_load_tokenizer_gives_bytes_for_presets_and_the_checkpoint_tokenizer_otherwise(ckpts, tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)
    assert isinstance(load_tokenizer(ckpts["llama"]), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # a checkpoint saved without tokenizer files
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_tokenizer(str(tmp_path / "missing"))


def test_packing_with_a_bpe_tokenizer_puts_eos_between_documents(ckpts):
    tokenizer = load_tokenizer(ckpts["gpt2"])
    docs = ["The lobster is a crustacean.", "Second document here.", "Third one, longer than the rest of them."]
    packed = pack_documents(docs, tokenizer, seq_len=8)
    assert packed.ids.dtype == np.uint16 and packed.documents == 3 and packed.tokens == len(packed.ids)
    ends = np.flatnonzero(packed.ids == tokenizer.eos_id)
    assert len(ends) == 3 and ends[-1] == len(packed.ids) - 1
    pieces = np.split(packed.ids, ends[:-1] + 1)
    assert [tokenizer.decode(p[:-1]) for p in pieces] == docs
    assert [e.tolist() for e in tokenizer.encode_batch(docs)] == [tokenizer.encode(d).tolist() for d in docs]
    assert BatchSampler(packed.ids, seq_len=8, batch_size=2, seed=0).next_batch().shape == (2, 9)


def test_byte_identical_copies_have_the_same_identity(ckpts, tmp_path):
    copy = shutil.copytree(ckpts["gpt2"], tmp_path / "copy")
    first = checkpoint_identity(ckpts["gpt2"])
    assert checkpoint_identity(copy) == first
    assert first["tokenizer_sha256"] == tokenizer_files_sha256(ckpts["gpt2"])
    llama = checkpoint_identity(ckpts["llama"])
    assert llama["config_sha256"] != first["config_sha256"] and llama["weights_sha256"] != first["weights_sha256"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_round_trips_through_from_pretrained_with_the_same_weights_hash(ckpts, arch, tmp_path):
    model, _ = load_checkpoint(ckpts[arch])
    weights = parameter_tensors(model)
    out = tmp_path / "export"
    written = write_checkpoint(out, config_dict(model), weights, ckpts[arch], INFO)
    assert written == weights_hash(weights)
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert weights_hash(parameter_tensors(reloaded)) == written
    assert len(AutoTokenizer.from_pretrained(out, local_files_only=True)) == 400
    assert tokenizer_files_sha256(out) == tokenizer_files_sha256(ckpts[arch])
    info = json.loads((out / "fedjet.json").read_text())
    assert info["weights_sha256"] == written and info["job"] == "j1" and info["version"] == 3
    assert info["privacy"] == {"epsilon": 8.0} and info["tokenizer"]["kind"] == "hf" and info["peft"] is None
    assert not list(tmp_path.glob(".export.partial-*"))


def test_export_refuses_to_replace_anything_but_an_earlier_export(ckpts, tmp_path):
    model, _ = load_checkpoint(ckpts["gpt2"])
    args = (config_dict(model), parameter_tensors(model), ckpts["gpt2"], INFO)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_checkpoint(tmp_path / "busy", *args)
    with pytest.raises(ConfigError, match="not an earlier fedjet export"):
        write_checkpoint(tmp_path / "busy", *args, overwrite=True)
    write_checkpoint(tmp_path / "out", *args)
    write_checkpoint(tmp_path / "out", *args, overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_byte_tokenizer_models_export_a_tokenizer_autotokenizer_loads(tmp_path):
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    out = tmp_path / "bytes"
    write_checkpoint(out, config_dict(model), parameter_tensors(model), "bytes", INFO)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Ünïcode  and\nnewlines = x ="
    assert tokenizer.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text, eos=False).tolist()
    assert tokenizer.eos_token_id == 256 and len(tokenizer) == 257
    assert len(generate_text(out, "The ", max_new_tokens=8)) > len("The ")


def test_generate_continues_the_prompt_greedy_or_seeded(ckpts):
    prompt = "The lobster"
    greedy = generate_text(ckpts["gpt2"], prompt, max_new_tokens=12)
    assert greedy.startswith(prompt) and len(greedy) > len(prompt)
    assert greedy == generate_text(ckpts["gpt2"], prompt, max_new_tokens=12)
    sampled = generate_text(ckpts["llama"], prompt, max_new_tokens=12, seed=5, temperature=1.0)
    assert sampled == generate_text(ckpts["llama"], prompt, max_new_tokens=12, seed=5, temperature=1.0)
    assert len(sampled) > len(prompt)


def test_peft_flag_parses_validates_and_round_trips():
    assert parse_peft("lora") == LoraSpec()
    spec = parse_peft("lora:r=4,alpha=8,dropout=0,targets=c_attn,c_proj")
    assert spec == LoraSpec(r=4, alpha=8.0, dropout=0.0, targets=("c_attn", "c_proj"))
    assert parse_peft(spec.describe()) == spec
    for bad, why in [
        ("lora:rank=4", "unknown key"),
        ("lora:r=0", "positive"),
        ("lora:r=four", "invalid literal"),
        ("lora:dropout=1.5", r"\[0, 1\)"),
        ("lora:r=4,r=8", "twice"),
        ("lora:r=4,c_attn", "not key=value"),
        ("ia3:r=4", "only 'lora"),
        ("lora:targets=", "at least one"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_peft(bad)
    assert default_targets("gpt2") == ("c_attn",) and default_targets("llama") == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="no default LoRA targets"):
        default_targets("no-such-arch")


def test_lora_exchanges_only_adapters_initialised_identically_under_a_seed(wide_gpt2):
    spec = parse_peft("lora:r=4,alpha=8,dropout=0")
    first = exchanged_tensors(apply_lora(load_checkpoint(wide_gpt2)[0], spec, seed=7))
    second = exchanged_tensors(apply_lora(load_checkpoint(wide_gpt2)[0], spec, seed=7))
    other = exchanged_tensors(apply_lora(load_checkpoint(wide_gpt2)[0], spec, seed=8))
    assert weights_hash(first) == weights_hash(second) != weights_hash(other)
    assert first and all(".lora_A." in n or ".lora_B." in n for n in first) and all("default" not in n for n in first)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in first.values())
    full_bytes = sum(t.numel() * 4 for t in parameter_tensors(load_checkpoint(wide_gpt2)[0]).values())
    adapter_bytes = sum(t.numel() * 4 for t in first.values())
    assert adapter_bytes * 20 <= full_bytes, (adapter_bytes, full_bytes)


def test_loading_adapter_tensors_is_strict_about_names_and_shapes(ckpts):
    model = apply_lora(load_checkpoint(ckpts["llama"])[0], LoraSpec(r=2), seed=0)
    tensors = exchanged_tensors(model)
    assert {n.split(".")[-3] for n in tensors} == {"q_proj", "v_proj"}
    name = next(iter(tensors))
    with pytest.raises(ValidationError, match="missing"):
        load_exchanged(model, {n: t for n, t in tensors.items() if n != name})
    with pytest.raises(ValidationError, match="shape"):
        load_exchanged(model, {**tensors, name: torch.zeros(3, 3)})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_export_loads_in_peft_and_the_merged_model_gives_the_same_logits(ckpts, arch, tmp_path):
    from peft import PeftModel

    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0)
    model = apply_lora(load_checkpoint(ckpts[arch])[0], spec, seed=1)
    _nonzero_adapters(model, seed=2)
    adapters = exchanged_tensors(model)
    expected = _logits(model)
    kwargs = {"peft_spec": spec, "adapter_weights": adapters, "base_model_dir": ckpts[arch]}
    written = write_checkpoint(tmp_path / "adapter", {}, {}, ckpts[arch], INFO, **kwargs)
    assert written == weights_hash(adapters)
    base = AutoModelForCausalLM.from_pretrained(ckpts[arch], local_files_only=True)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(_logits(loaded.eval()), expected, atol=1e-5)
    write_checkpoint(tmp_path / "merged", {}, {}, ckpts[arch], INFO, merge=True, **kwargs)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert torch.allclose(_logits(merged), expected, atol=1e-4)
    assert torch.allclose(_logits(merge_and_unload(model)), expected, atol=1e-4)
    info = json.loads((tmp_path / "merged" / "fedjet.json").read_text())
    assert info["peft"] == spec.describe() and info["merged"] and info["weights_sha256"] == written
    assert info["merged_weights_sha256"] == weights_hash(parameter_tensors(merged))
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged", local_files_only=True)) == 400


def test_lora_export_builds_the_base_from_config_and_weights_when_no_directory_is_given(ckpts, tmp_path):
    base, _ = load_checkpoint(ckpts["gpt2"])
    config, weights = config_dict(base), parameter_tensors(base)
    model = apply_lora(base, LoraSpec(r=2), seed=0)
    _nonzero_adapters(model, seed=3)
    adapters = exchanged_tensors(model)
    write_checkpoint(tmp_path / "a", config, weights, None, INFO, peft_spec="lora:r=2", adapter_weights=adapters)
    info = json.loads((tmp_path / "a" / "fedjet.json").read_text())
    assert info["base_weights_sha256"] == weights_hash(weights) and info["tokenizer"] is None
