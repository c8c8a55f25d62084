"""The real cross-cloud job: a team's checkpoint and per-cloud files in, a trained model out.

Separate ``fedjet coordinator`` / ``fedjet worker`` processes over a real nats-server, each cloud
with its own data in its own format and its own copy of a (tiny, locally built) Llama
checkpoint with a trained BPE tokenizer; then ``fedjet export`` and ``from_pretrained``. And a
LoRA run of a tiny GPT-2 through ``fedjet up --data-per-cloud``.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.kv import read_stats
from fedjet.data.wikitext import load_directory
from fedjet.models.tiny import save_tiny_gpt2, save_tiny_llama, train_bpe_tokenizer
from tests.conftest import FedjetProcess, run_fedjet

pytestmark = pytest.mark.e2e
TRAIN = ["--local-steps", "8", "--batch-size", "8", "--seq-len", "32", "--lr", "0.005"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_bpe_tokenizer(data_dir)
    return {
        "llama": save_tiny_llama(root / "llama", tokenizer),
        "gpt2": save_tiny_gpt2(root / "gpt2", tokenizer, n_embd=128),
    }


@pytest.fixture(scope="module")
def cloud_data(tmp_path_factory, data_dir):
    """Three clouds, three formats: .txt files, a .jsonl file, a WikiText directory."""
    root = tmp_path_factory.mktemp("clouds")
    articles = load_directory(data_dir).train
    aws, gcp, azure = root / "aws", root / "gcp", root / "azure"
    for d in (aws, gcp, azure):
        d.mkdir()
    for i, article in enumerate(articles[0:8]):
        (aws / f"doc{i}.txt").write_text(article.text, encoding="utf-8")
    (aws / "empty.txt").write_text("")  # counted and skipped, never a crash
    with (gcp / "notes.jsonl").open("w", encoding="utf-8") as fh:
        for article in articles[8:16]:
            fh.write(json.dumps({"text": article.text, "id": article.title}) + "\n")
    (azure / "wiki.valid.tokens").write_text("".join(a.text for a in articles[16:24]), encoding="utf-8")
    held_out = root / "eval"
    held_out.mkdir()
    for i, article in enumerate(load_directory(data_dir).eval[:3]):
        (held_out / f"eval{i}.md").write_text(article.text, encoding="utf-8")
    return {"aws": aws, "gcp": gcp, "azure": azure, "eval": held_out}


def fedjet_process(*args: str) -> FedjetProcess:
    return FedjetProcess(*args)


def finish(proc: FedjetProcess, timeout: float = 240) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return out + err


def heldout_loss(model_dir: Path, eval_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tokenizer("".join(p.read_text() for p in sorted(eval_dir.iterdir())), return_tensors="pt").input_ids
    windows = ids[0, : (ids.shape[1] // 33) * 33].view(-1, 33)[:64]
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def start_job(
    nats_url: str, keys: Path, job: str, model: str, cloud_data: dict
) -> tuple[FedjetProcess, list[FedjetProcess]]:
    """The coordinator and one worker per cloud, each a ``fedjet`` process of its own."""
    coordinator = fedjet_process(
        "coordinator", "--nats", nats_url, "--keys", str(keys), "--job", job, "--model", model,
        "--rounds", "3", "--codec", "dense", *TRAIN,
    )  # fmt: skip
    workers = [
        fedjet_process(
            "worker",
            "--nats",
            nats_url,
            "--keys",
            str(keys),
            "--job",
            job,
            "--cloud",
            cloud,
            "--model",
            model,
            "--data",
            str(cloud_data[cloud]),
        )
        for cloud in ("aws", "gcp", "azure")
    ]
    return coordinator, workers


def forge_tokenizer(model: str, forged: Path) -> Path:
    """A copy of ``model`` whose tokenizer has two ids swapped: same size, other meanings."""
    shutil.copytree(model, forged)
    tok = json.loads((forged / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped: other meanings
    (forged / "tokenizer.json").write_text(json.dumps(tok))
    return forged


def test_separate_processes_train_a_local_llama_on_each_clouds_own_files_and_export_it(
    nats_url, tmp_path, checkpoints, cloud_data
):
    job, keys, out = f"own-{uuid.uuid4().hex[:6]}", tmp_path / "keys", tmp_path / "trained"
    assert run_fedjet("keys", "generate", "--out", str(keys), "--clouds", "aws,gcp,azure").returncode == 0
    model = str(checkpoints["llama"])
    coordinator, workers = start_job(nats_url, keys, job, model, cloud_data)
    finish(coordinator)
    logs = [finish(w) for w in workers]
    assert '"skipped": {"empty file": 1}' in logs[0]

    stats = asyncio.run(_stats(nats_url, job))
    for cloud, s in stats.items():
        assert s["initial_weights"] == "local", cloud  # version 0 never crossed the broker to it
        assert s["data_documents"] > 0 and s["data_tokens"] > 1000 and s["heldout_loss"] > 0
    # dense updates change every weight, so versions 1 and 2 cross whole (the final version 3
    # is not trained on): two model sizes down per cloud, not three: version 0 stayed home
    llama_bytes = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    assert all(1.5 * llama_bytes < s["bytes_down"] < 2.5 * llama_bytes for s in stats.values()), stats

    exported = run_fedjet(
        "export", "--nats", nats_url, "--job", job, "--keys", str(keys), "--out", str(out), "--model", model
    )
    assert exported.returncode == 0, exported.stderr
    info = json.loads((out / "fedjet.json").read_text())
    verify = run_fedjet("replay", "--nats", nats_url, "--job", job, "--keys", str(keys), "--verify", "--no-progress")
    assert verify.returncode == 0 and json.loads(verify.stdout.splitlines()[-1])["mismatches"] == 0
    assert info["version"] == 3 and info["weights_sha256"] == info["hash"]  # the recorded version's hash
    assert heldout_loss(out, cloud_data["eval"]) < heldout_loss(Path(model), cloud_data["eval"])
    sample = run_fedjet("generate", "--model", str(out), "--prompt", "The game", "--max-new-tokens", "8")
    assert sample.returncode == 0 and sample.stdout.startswith("The game") and len(sample.stdout.strip()) > 8

    forged = forge_tokenizer(model, tmp_path / "forged")
    refused = run_fedjet(
        "worker", "--nats", nats_url, "--keys", str(keys), "--job", job, "--cloud", "aws", "--worker-id", "7",
        "--model", str(forged), "--data", str(cloud_data["aws"]), timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "differs from the job's" in refused.stderr


async def _stats(url: str, job: str) -> dict:
    nc = await connect(url, "test")
    try:
        return await read_stats(nc.jetstream(), JobSubjects(job), ("aws", "gcp", "azure"))
    finally:
        await close_quietly(nc)


def test_lora_exchanges_adapters_only_and_exports_an_adapter_peft_loads(tmp_path, checkpoints, cloud_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, report_path, saved = str(checkpoints["gpt2"]), tmp_path / "report.json", tmp_path / "adapter"
    per_cloud = ",".join(f"{c}={cloud_data[c]}" for c in ("aws", "gcp", "azure"))
    result = run_fedjet(
        "up", "--model", model, "--peft", "lora:r=4,alpha=8,dropout=0", "--data-per-cloud", per_cloud,
        "--eval-data", str(cloud_data["eval"]), "--rounds", "2", "--codec", "dense", *TRAIN,
        "--eval-tokens", "2048", "--report", str(report_path), "--save", str(saved), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked" not in result.stderr and "Loading weights" not in result.stdout + result.stderr  # no bar, no lock
    report = json.loads(report_path.read_text())
    full = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    dense_update = 4 * sum(p.numel() for p in full.parameters())
    per_update = report["summary"]["bytes_up"] / report["summary"]["updates_applied"]
    assert per_update * 20 <= dense_update, (per_update, dense_update)
    assert report["rounds"][-1]["eval_loss"] < report["rounds"][0]["eval_loss"]
    adapted = PeftModel.from_pretrained(full, saved)
    assert any("lora_A" in n for n, _ in adapted.named_parameters())
    assert math.isfinite(float(adapted(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()))
