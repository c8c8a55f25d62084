"""Local training and evaluation: compute only, no I/O (run in a thread by the daemon)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedjet.config.job import TrainConfig
from fedjet.data.batches import BatchSampler
from fedjet.errors import ConfigError

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class StepsResult:
    """A phase's figures for the whole cloud: ``sequences`` and ``tokens`` of every replica
    (``replicas`` ranks, each the same steps on its own slice)."""

    mean_loss: float
    sequences: int
    tokens: int
    compute_s: float
    wall_s: float
    replicas: int = 1

    @property
    def tokens_per_replica(self) -> int:
        """The steps' tokens as the job's batch counts them (steps x batch x seq_len)."""
        return self.tokens // self.replicas


@dataclass(frozen=True)
class EvalResult:
    loss: float
    ppl: float
    acc: float
    tokens: int


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean next-token cross entropy, plus correct predictions and count."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    correct = int((logits.argmax(-1) == targets).sum())
    return loss, correct, targets.numel()


class Trainable(Protocol):
    """The model and which of its tensors travel (see ``fedjet.models.job_model.JobModel``)."""

    model: torch.nn.Module

    def exchanged(self) -> dict[str, torch.Tensor]: ...

    def load(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def trainable(self) -> dict[str, torch.nn.Parameter]: ...


def pick_precision(requested: str | None, device: torch.device) -> str:
    """bf16 autocast where the device supports it (CUDA with bf16), fp32 otherwise."""
    if requested is not None:
        if requested not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {PRECISIONS}, got {requested!r}")
        if requested == "bf16" and device.type != "cuda":
            raise ConfigError("--precision bf16 needs a CUDA device; on CPU fedjet trains in fp32")
        return requested
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


class LocalTrainer:
    """One cloud's model and optimizer; the optimizer state persists across rounds (as DiLoCo)."""

    def __init__(
        self,
        job_model: Trainable,
        sampler: BatchSampler,
        settings: TrainConfig,
        device: torch.device,
        *,
        slowdown: float = 1.0,
        precision: str | None = None,
    ) -> None:
        self.job_model = job_model
        self.model = job_model.model.to(device)
        self.sampler = sampler
        self.settings = settings
        self.device = device
        self.slowdown = slowdown
        self.precision = pick_precision(precision, device)
        self.stopping = threading.Event()  # set from the event loop thread to end a round early
        self._corrections: list[dict[str, torch.Tensor]] = []  # added to the weights at the next step
        self._corrections_lock = threading.Lock()
        params = list(job_model.trainable().values())
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, **fused)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.job_model.load(tensors)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.job_model.exchanged()

    def correct(self, change: dict[str, torch.Tensor]) -> None:
        """Add ``change`` to the weights before the next step (from any thread): a global that
        arrives while the phase trains moves the model onto it without stopping it."""
        with self._corrections_lock:
            self._corrections.append(change)

    def apply_corrections(self) -> bool:
        """Add every pending change now; whether there was one."""
        with self._corrections_lock:
            pending, self._corrections = self._corrections, []
        if not pending:
            return False
        current = self.weights()
        total = {n: t.clone() for n, t in current.items()}
        for change in pending:
            for name, value in change.items():
                total[name] += value.to(total[name].dtype)
        self.load(total)
        return True

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self, steps: int) -> StepsResult:
        """``steps`` optimizer steps on local batches."""
        threads_here()
        self.model.train()
        losses, started, compute = [], time.perf_counter(), 0.0
        for _ in range(steps):
            if not self._before_step():
                break
            t0 = time.perf_counter()
            with self._autocast():
                loss, _, _ = lm_loss(self.model, self._batch())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.settings.grad_clip)
            self.optimizer.step()
            losses.append(loss.detach().item())
            compute += self._pace(time.perf_counter() - t0)
        return self._result(losses, compute, started)

    def _before_step(self) -> bool:
        """Whether to take the next step (no stop asked), with any pending correction applied."""
        if self.stopping.is_set():
            return False
        self.apply_corrections()
        return True

    def run_steps(self, steps: int, step: Callable[[], object]) -> int:
        """Up to ``steps`` calls of ``step`` (a DP-SGD step, which draws its own batch), ending
        early on a stop as a phase does; how many were taken."""
        taken = 0
        while taken < steps and self._go():
            step()
            taken += 1
        return taken

    def _go(self) -> bool:
        """Whether :meth:`run_steps` takes its next step (the ranks of a group agree on it)."""
        return not self.stopping.is_set()

    def gradient(self, steps: int) -> tuple[dict[str, torch.Tensor], StepsResult]:
        """Mean gradient over ``steps`` batches at the current weights (gradient aggregation)."""
        threads_here()
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        losses, started, compute = [], time.perf_counter(), 0.0
        for _ in range(steps):
            if not self._go():  # the ranks of a group stop at the same batch
                break
            t0 = time.perf_counter()
            with self._autocast():
                loss, _, _ = lm_loss(self.model, self._batch())
            (loss / steps).backward()
            losses.append(loss.detach().item())
            compute += self._pace(time.perf_counter() - t0)
        grads = {
            n: full_value(p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu", torch.float32)
            for n, p in self.job_model.trainable().items()
        }
        self.model.zero_grad(set_to_none=True)
        return grads, self._result(losses, compute, started)

    def evaluate(self, windows: np.ndarray) -> EvalResult:
        """This model's figures on ``windows`` (a cloud's held-out slice)."""
        return evaluate(self.model, windows, self.device)

    def has_corrections(self) -> bool:
        with self._corrections_lock:
            return bool(self._corrections)

    def _batch(self) -> torch.Tensor:
        return torch.from_numpy(self.sampler.next_batch()).to(self.device)

    def _pace(self, step_s: float) -> float:
        """Simulate a slower cloud: stretch each step to ``slowdown`` times its real time."""
        if self.slowdown > 1.0:
            time.sleep(step_s * (self.slowdown - 1.0))
        return step_s * max(self.slowdown, 1.0)

    def _result(self, losses: list[float], compute: float, started: float) -> StepsResult:
        sequences = len(losses) * self.settings.batch_size
        return StepsResult(
            mean_loss=float(np.mean(losses)) if losses else float("nan"),
            sequences=sequences,
            tokens=sequences * self.settings.seq_len,
            compute_s=compute,
            wall_s=time.perf_counter() - started,
        )


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor a sharded one (a DTensor of ``--shard``) is part of, gathered from every
    rank: a collective, so every rank calls it for the same tensors in the same order. A plain
    tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def threads_here() -> None:
    """The process's intra-op thread count, applied in the calling thread: a worker trains on a
    thread of its event loop's pool, where OpenMP starts from its default (every core) whatever
    the main thread set. Two CPU ranks of 1 thread each then ran 3 threads on 2 cores, and a
    phase on the pool's thread took 20 % longer than on the main thread."""
    torch.set_num_threads(torch.get_num_threads())


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model a DDP wrapper holds (the model itself when there is none): a replica of a
    cloud's ranks evaluates alone, and DP-SGD differentiates it per example and sums over the
    ranks itself (DDP's averaging would mix in unclipped examples)."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, torch.nn.Module)
    return inner


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: np.ndarray, device: torch.device, batch_size: int = 16) -> EvalResult:
    """Loss, perplexity and next-token accuracy over fixed evaluation windows."""
    threads_here()
    model = unwrapped(model)
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start : start + batch_size]).to(device)
        loss, right, n = lm_loss(model, batch)
        total_loss += float(loss) * n
        correct += right
        count += n
    mean = total_loss / count
    return EvalResult(loss=mean, ppl=math.exp(min(mean, 50.0)), acc=correct / count, tokens=count)
