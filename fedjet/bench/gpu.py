"""``fedjet bench gpu``: fedjet's training throughput against bare loops of the same
configuration, measured in one run on the same machine (a GPU when there is one, else CPU).

The reference is what the same hardware does without fedjet: with ``--nproc-per-node 1``,
``--clouds`` concurrent bare loops (one process each, as the workers are); with N ranks, one
bare DDP loop on N ranks (an FSDP2 loop with ``--shard``). Same model, batch, sequence length,
precision and training step (the workers' own :class:`~fedjet.worker.train.LocalTrainer`), no
NATS and no codecs. Each loop warms up, waits for the others, then times ``--bare-steps`` steps.

fedjet's side is ``fedjet up`` with those clouds (or one cloud of N ranks). Steady-state tokens/s
is each cloud's tokens over its time inside training steps, summed; start-up, waits for versions
and the rest (held-out evaluation, encoding, sending) are reported apart, in seconds, with the
whole-run tokens/s beside them.

The bare loops run before fedjet and again after it, and the ratio is taken against the faster
of the two: a shared machine that slows down during one reference cannot flatter fedjet.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedjet.errors import ConfigError

CLOUD_NAMES = ("aws", "gcp", "azure", "oci", "ibm", "alibaba")


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
    clouds: int = 3
    nproc_per_node: int = 1
    shard: bool = False  # the ranks shard the model (FSDP2), fedjet's and the bare loop's alike
    device: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.clouds <= len(CLOUD_NAMES):
            raise ConfigError(f"--clouds must be 1..{len(CLOUD_NAMES)}, got {self.clouds}")
        if self.nproc_per_node < 1 or (self.nproc_per_node > 1 and self.clouds != 1):
            raise ConfigError("--nproc-per-node N >= 2 measures one cloud of N ranks: give --clouds 1")
        if self.shard and self.nproc_per_node < 2:
            raise ConfigError("--shard splits the model over ranks: give --nproc-per-node >= 2")
        if min(self.rounds, self.local_steps, self.batch_size, self.bare_steps) < 1:
            raise ConfigError("--rounds, --local-steps, --batch-size and --bare-steps must be >= 1")

    @property
    def cloud_names(self) -> tuple[str, ...]:
        return CLOUD_NAMES[: self.clouds]


def bare_reference(config: GpuBenchConfig) -> dict[str, Any]:
    """The bare loops, started together; tokens/s summed over them (over the ranks of DDP)."""
    world = config.nproc_per_node
    loops = config.clouds if world == 1 else world
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready = context.Barrier(loops)
    with tempfile.TemporaryDirectory(prefix="fedjet-bare-") as tmp:
        init = f"file://{Path(tmp) / 'group'}"
        procs = [
            context.Process(target=_bare_loop, args=(i, world, init, config, ready, results)) for i in range(loops)
        ]
        for proc in procs:
            proc.start()
        measured = [results.get(timeout=1800) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
    failed = [m for m in measured if "error" in m]
    if failed:
        raise RuntimeError(f"a bare loop failed: {failed[0]['error']}")
    per_loop = [m["tokens"] / m["seconds"] for m in sorted(measured, key=lambda m: m["index"])]
    return {
        "tokens_per_s": sum(per_loop), "per_loop_tokens_per_s": per_loop, "loops": config.clouds if world == 1 else 1,
        "ranks": world, "steps": config.bare_steps, "precision": measured[0]["precision"],
        "device": measured[0]["device"],
    }  # fmt: skip


def _bare_loop(index: int, world: int, init: str, config: GpuBenchConfig, ready: Any, results: Any) -> None:
    """One bare loop (``world`` 1) or one rank of a bare DDP loop: warm up, wait, time."""
    try:
        from fedjet.config.flags import job_config
        from fedjet.data.batches import BatchSampler
        from fedjet.data.packing import pack_documents
        from fedjet.data.tokenizer import ByteTokenizer
        from fedjet.data.wikitext import load_corpus
        from fedjet.models.build import pick_device
        from fedjet.models.job_model import initial_job_model
        from fedjet.worker.ranks import RankPlace, RankSlice, data_parallel, join_group, shard_model
        from fedjet.worker.train import LocalTrainer

        job = job_config(overrides=_job(config, "bare"))
        device = pick_device(config.device)
        tokens = pack_documents([a.text for a in load_corpus(config.data).train], ByteTokenizer(), config.seq_len).ids
        seed = index if world == 1 else 0  # the ranks of one loop draw the same global batches
        sampler: Any = BatchSampler(tokens, config.seq_len, config.batch_size * world, seed=seed)
        if world > 1:
            place = RankPlace(index, world)
            device = join_group(place, init, device)
            sampler = RankSlice(sampler, place)
        job_model = initial_job_model(job)
        if config.shard:
            shard_model(job_model.model)
        trainer = LocalTrainer(job_model, sampler, job.train, device, precision=config.precision)
        if world > 1 and not config.shard:
            trainer.model = data_parallel(trainer.model, device)
        trainer.train(3)  # warm-up: kernels, allocator
        _sync()
        ready.wait(timeout=600)  # the loops' timed steps overlap, as the workers' do
        started = time.perf_counter()
        result = trainer.train(config.bare_steps)
        _sync()
        seconds = time.perf_counter() - started
        results.put({
            "index": index, "tokens": result.tokens, "seconds": seconds, "precision": trainer.precision,
            "device": str(device),
        })  # fmt: skip
        if world > 1:
            torch.distributed.destroy_process_group()
    except Exception as e:  # noqa: BLE001  # a process boundary: the parent fails the bench with it
        results.put({"index": index, "error": f"{type(e).__name__}: {e}"})


def fedjet_run(config: GpuBenchConfig) -> dict[str, Any]:
    from fedjet.config.flags import job_config
    from fedjet.runner.up import UpConfig, run_up

    report = run_up(
        UpConfig(
            job=job_config(overrides=_job(config, f"gpu-{int(time.time())}")),
            data=config.data,
            precision=config.precision,
            device=config.device,
            nproc_per_node=config.nproc_per_node,
            shard=config.shard,
            eval_tokens=8192,
            eval_every=config.rounds,  # version 0 and the last: the observer's forward passes share the machine
            quiet=True,
        )
    )
    clouds = list(report.clouds.values())
    missing = [k for k in ("tokens", "compute_s", "wait_s", "lifetime_s") if any(k not in c for c in clouds)]
    if missing:
        raise RuntimeError(f"the run's report lacks {missing}: no ratio can be made")
    tokens = sum(int(c["tokens"]) for c in clouds)
    compute = [float(c["compute_s"]) for c in clouds]
    if min(compute) <= 0 or tokens <= 0:
        raise RuntimeError("a cloud trained no tokens: no steady-state rate")
    lifetime = max(float(c["lifetime_s"]) for c in clouds)
    waits = [float(c["wait_s"]) for c in clouds]
    s = report.summary
    return {
        "steady_tokens_per_s": sum(int(c["tokens"]) / float(c["compute_s"]) for c in clouds),
        "run_tokens_per_s": tokens / lifetime,
        "tokens": tokens,
        "compute_s": compute,
        "wait_s": waits,
        "startup_and_other_s": [float(c["lifetime_s"]) - t - w for c, t, w in zip(clouds, compute, waits, strict=True)],
        "lifetime_s": [float(c["lifetime_s"]) for c in clouds],
        "idle_frac": [float(c["idle_frac"]) for c in clouds],
        "bytes_up": s["bytes_up"],
        "bytes_down": s["bytes_down"],
        "initial_eval_loss": s["initial_eval_loss"],
        "final_eval_loss": s["final_eval_loss"],
    }


def run(config: GpuBenchConfig) -> dict[str, Any]:
    before = bare_reference(config)
    fed = fedjet_run(config)
    after = bare_reference(config)
    return {"config": asdict(config), **compared(fed, [before, after])}


def compared(fed: dict[str, Any], bares: list[dict[str, Any]]) -> dict[str, Any]:
    """fedjet's rates over the fastest bare reference's (``bare``; every one in ``bare_runs``)."""
    if not bares:
        raise ValueError("no bare reference to compare with")
    bare = max(bares, key=lambda b: float(b["tokens_per_s"]))
    reference = float(bare["tokens_per_s"])
    if reference <= 0:
        raise RuntimeError("the bare loops trained no tokens: no ratio can be made")
    return {
        "bare": bare,
        "bare_runs": [float(b["tokens_per_s"]) for b in bares],
        "fedjet": fed,
        "ratio": float(fed["steady_tokens_per_s"]) / reference,
        "run_ratio": float(fed["run_tokens_per_s"]) / reference,
    }


def _job(config: GpuBenchConfig, name: str) -> dict[str, Any]:
    return {
        "job": name,
        "model": config.model,
        "codec": config.codec,
        "clouds": list(config.cloud_names),
        "train": {"local_steps": config.local_steps, "batch_size": config.batch_size, "seq_len": config.seq_len},
        "stop": {"rounds": config.rounds},
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
