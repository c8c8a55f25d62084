"""``fedjet bench gpu``: fedjet's training throughput on one GPU against a bare loop.

In the same run: a bare PyTorch loop of the same model, precision and batch (the physical
reference), then ``fedjet up`` with three workers sharing the GPU. Reported: tokens/s of both
and their ratio, the workers' idle fraction, and whole-run bytes (up + down, as the workers
counted them, version 0 included when it crossed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedjet.config.flags import job_config
from fedjet.data.batches import BatchSampler
from fedjet.data.packing import pack_documents
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.data.wikitext import load_corpus
from fedjet.models.build import pick_device
from fedjet.models.job_model import initial_job_model
from fedjet.worker.train import LocalTrainer


@dataclass(frozen=True, kw_only=True)
class GpuBenchConfig:
    model: str = "base"
    rounds: int = 4
    local_steps: int = 20
    batch_size: int = 16
    seq_len: int = 256
    precision: str | None = None
    codec: str = "topk:0.01+int8"
    data: str | None = None
    bare_steps: int = 30


def bare_tokens_per_s(config: GpuBenchConfig) -> dict[str, float]:
    """A plain loop of the job's own trainer over the same data, no NATS, no codecs."""
    job = job_config(overrides=_job(config, "bare"))
    jm = initial_job_model(job)
    tokens = pack_documents([a.text for a in load_corpus(config.data).train], ByteTokenizer(), config.seq_len).ids
    sampler = BatchSampler(tokens, config.seq_len, config.batch_size, seed=0)
    trainer = LocalTrainer(jm, sampler, job.train, pick_device(None), precision=config.precision)
    trainer.train(3)  # warm-up: kernels, allocator
    _sync()
    started = time.perf_counter()
    result = trainer.train(config.bare_steps)
    _sync()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": result.tokens / elapsed, "precision": trainer.precision, "steps": config.bare_steps}


def fedjet_run(config: GpuBenchConfig) -> dict[str, Any]:
    from fedjet.runner.up import UpConfig, run_up

    report = run_up(
        UpConfig(
            job=job_config(overrides=_job(config, f"gpu-{int(time.time())}")),
            data=config.data,
            precision=config.precision,
            eval_tokens=8192,
            quiet=True,
        )
    )
    clouds = report.clouds.values()
    tokens = sum(int(c.get("tokens", 0)) for c in clouds)
    wall = max(float(c.get("wall_s", 0.0)) for c in clouds)
    s = report.summary
    return {
        "tokens_per_s": tokens / wall if wall else 0.0,
        "compute_tokens_per_s": sum(float(c.get("tokens_per_s", 0.0)) for c in clouds),
        "idle_frac": float(np.mean([float(c["idle_frac"]) for c in clouds])),
        "bytes_up": s["bytes_up"],
        "bytes_down": s["bytes_down"],
        "initial_eval_loss": s["initial_eval_loss"],
        "final_eval_loss": s["final_eval_loss"],
        "wall_s": s["wall_s"],
    }


def run(config: GpuBenchConfig) -> dict[str, Any]:
    bare = bare_tokens_per_s(config)
    fed = fedjet_run(config)
    return {"config": config.__dict__, "bare": bare, "fedjet": fed, "ratio": fed["tokens_per_s"] / bare["tokens_per_s"]}


def _job(config: GpuBenchConfig, name: str) -> dict[str, Any]:
    return {
        "job": name,
        "model": config.model,
        "codec": config.codec,
        "train": {"local_steps": config.local_steps, "batch_size": config.batch_size, "seq_len": config.seq_len},
        "stop": {"rounds": config.rounds},
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
