"""A cloud that is a cluster: one worker's local training on N ranks with ``torch.distributed``.

The cloud stays one federated party: its ranks train one model together (DDP: gradients are
averaged across ranks at every step, so every rank takes the same optimizer step and the
replicas stay equal), and rank 0 alone builds the cloud's one update. The ranks train on
disjoint slices of the cloud's data: every rank draws the same global batch of ``world × b``
windows from the same seeded sampler and keeps its own ``b`` rows, so a worker with 2 ranks of
batch b takes exactly the steps of one rank with batch 2b (up to float summation order).

Backend gloo on CPU, nccl on CUDA. This module is the training core; it does not speak NATS.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fedjet.data.batches import BatchSampler
from fedjet.errors import ConfigError
from fedjet.worker.train import EvalResult, LocalTrainer, StepsResult, full_value

TIMEOUT_S = float(os.environ.get("FEDJET_RANK_TIMEOUT_S", "120"))  # a dead rank ends the others' collectives
KEEP_ALIVE_S = TIMEOUT_S / 6  # between phases rank 0 tells the others it lives, well within the timeout


@dataclass(frozen=True)
class RankPlace:
    """Where one process sits in its cloud's group."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is not in 0..{self.world - 1}")


class RankSlice:
    """This rank's rows of the cloud's global batch (``world × b`` windows, the same on every
    rank): disjoint slices of the same draws."""

    def __init__(self, sampler: BatchSampler, place: RankPlace) -> None:
        if sampler.batch_size % place.world:
            raise ConfigError(f"a global batch of {sampler.batch_size} does not split over {place.world} ranks")
        self.sampler = sampler
        self.place = place
        self.batch_size = sampler.batch_size // place.world

    def next_batch(self) -> np.ndarray:
        batch = self.sampler.next_batch()
        start = self.place.rank * self.batch_size
        return batch[start : start + self.batch_size]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_group(place: RankPlace, init_method: str, device: torch.device) -> torch.device:
    """Join the cloud's process group (``init_method``: a ``file://`` or ``tcp://`` rendezvous);
    returns the device this rank trains on (:func:`rank_device`)."""
    device = rank_device(device, place)
    dist.init_process_group(
        backend_for(device),
        init_method=init_method,
        rank=place.rank,
        world_size=place.world,
        timeout=dt.timedelta(seconds=TIMEOUT_S),
    )
    return device


def rank_device(device: torch.device, place: RankPlace) -> torch.device:
    """A CUDA rank trains on a GPU of its own (the named one plus its rank, round the GPUs: NCCL
    refuses two ranks on one GPU); CPU ranks share the cores, cores / ranks threads each (as
    ``torchrun`` gives each rank one thread), unless ``OMP_NUM_THREADS`` says otherwise."""
    if device.type == "cuda":
        count = max(1, torch.cuda.device_count())
        device = torch.device("cuda", ((device.index or 0) + place.rank) % count)
        torch.cuda.set_device(device)
        return device
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // place.world))
    return device


def data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` wrapped so that its gradients are averaged across the group at every step."""
    # no buffer broadcast: GPT-2's buffers are constant masks, and a lone forward pass (rank 0's
    # held-out loss) must not wait for the other ranks
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def shard_model(model: torch.nn.Module) -> int:
    """``--shard``: the model's parameters split over the ranks with FSDP2 (``fully_shard``),
    each block of the architecture on its own (the blocks ``transformers`` names as never to
    be split), then the rest; a rank holds 1/world of the weights, gradients and optimizer
    state, and gathers a block's weights only while it computes it. How many blocks."""
    from torch.distributed.fsdp import fully_shard

    kinds = _unsplit_kinds(model)
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)


def _unsplit_kinds(model: torch.nn.Module) -> set[str]:
    for module in model.modules():  # a LoRA wrapper holds the model that names them
        kinds = getattr(module, "_no_split_modules", None)
        if kinds:
            return set(kinds)
    return set()


def gather_full(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Every sharded parameter whole, on CPU, name by name (a collective over the group)."""
    with torch.no_grad():
        return {name: full_value(params[name]).detach().to("cpu", copy=True) for name in sorted(params)}


def scatter_full(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's whole ``tensors`` into every rank's shards of the same parameters (a
    collective; ranks > 0 pass None). Rank 0 must give every parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tensors is not None:
        check_whole(params, tensors)
    with torch.no_grad():
        for name in sorted(params):
            param = params[name]
            local = param.to_local() if isinstance(param, DTensor) else param
            if tensors is not None:
                whole = tensors[name].to(local.device, param.dtype).contiguous()
            else:
                whole = torch.empty(param.shape, dtype=param.dtype, device=local.device)
            dist.broadcast(whole, src=0)
            if isinstance(param, DTensor):
                param.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None))
            else:
                param.copy_(whole)


def check_whole(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """A sharded model loads every tensor at once (checked before the others are told to load)."""
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ConfigError(f"a sharded model loads every tensor at once: missing {missing[:3]}, unknown {extra[:3]}")


def evaluate_sharded(trainer: LocalTrainer, windows: np.ndarray) -> EvalResult:
    """A sharded model's held-out figures (every rank computes them), its weights sharded
    again after: FSDP2 keeps the root's weights whole after a forward pass for the backward pass
    that usually follows, and a gradient phase after an evaluation then read stale gradients
    of the root's tensors (embeddings, final norm)."""
    from torch.distributed.fsdp import FSDPModule

    try:
        return LocalTrainer.evaluate(trainer, windows)
    finally:
        for module in trainer.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def broadcast_weights(tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0's values into every rank's tensors of the same names, in place."""
    for name in sorted(tensors):
        dist.broadcast(tensors[name], src=0)


def sum_over_ranks(tensors: dict[str, torch.Tensor]) -> None:
    """Every rank's tensors of the same names summed, in place on every rank."""
    for name in sorted(tensors):
        dist.all_reduce(tensors[name])


def mean_over_ranks(value: float) -> float:
    """The mean of every rank's ``value`` (each rank trained an equal slice of the batch)."""
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, float(value))
    return sum(float(v) for v in values) / len(values)  # type: ignore[arg-type]


def command(message: list[object] | None = None) -> list[object]:
    """Rank 0 sends ``message`` (a small list) to every rank; the others receive and return it."""
    box: list[object] = [message]
    dist.broadcast_object_list(box, src=0)
    received = box[0]
    assert isinstance(received, list)
    return received


class GroupTrainer(LocalTrainer):
    """Rank 0's trainer: every phase, step and weight change is mirrored by the other ranks,
    which run :func:`follow`. A stop asked mid-phase ends the phase on every rank at the same
    step; a correction applied between steps reaches every replica before the next step.

    ``sharded`` (``--shard``): no rank holds the whole model, so reading the weights, loading
    them and evaluating are collectives too, each announced to the others between phases."""

    _in_phase = False
    sharded = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group = threading.RLock()  # one thread at a time speaks to the group

    def weights(self) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return super().weights()
        with self._group:
            if not self._in_phase:
                command(["gather"])
            return gather_full(self.job_model.trainable())

    def evaluate(self, windows: np.ndarray) -> EvalResult:
        if not self.sharded:  # a replica evaluates alone
            return super().evaluate(windows)
        with self._group:
            command(["eval"])
            return evaluate_sharded(self, windows)

    def train(self, steps: int) -> StepsResult:
        """The phase on every rank; its figures are the cloud's: the sequences and tokens of
        all ranks (equal slices) and the mean of their losses, which the update claims."""
        _, result = self._phase("train", steps, lambda: (None, super(GroupTrainer, self).train(steps)))
        return result

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with self._group:
            if self.sharded:
                params = self.job_model.trainable()
                check_whole(params, tensors)
                if not self._in_phase:
                    command(["load"])
                scatter_full(params, tensors)
                return
            super().load(tensors)
            if not self._in_phase:  # between phases: the others wait for a command
                command(["load"])
                broadcast_weights(self.weights())

    def run_steps(self, steps: int, step: Callable[[], object]) -> int:
        """A DP-SGD phase on every rank (each runs its own share's step)."""
        with self._group:
            command(["dp_train", steps])
            return super().run_steps(steps, step)

    def _go(self) -> bool:
        go = super()._go()
        command([go])  # every rank stops at the same step
        return go

    def keep_alive(self) -> bool:
        """Between phases, tell the other ranks that rank 0 lives: their wait for the next
        command is a collective, which times out (``TIMEOUT_S``) while rank 0 waits for a
        version, however long other clouds take. False when a phase holds the group."""
        if not self._group.acquire(blocking=False):
            return False
        try:
            command(["idle"])
            return True
        finally:
            self._group.release()

    def _before_step(self) -> bool:
        go = not self.stopping.is_set()
        if self.sharded:  # the others first hear that a correction comes: it is read and loaded together
            corrected = go and self.has_corrections()
            command([go, corrected])
            if corrected:
                self.apply_corrections()
            return go
        corrected = go and self.apply_corrections()
        command([go, corrected])
        if corrected:
            broadcast_weights(self.weights())
        return go

    def gradient(self, steps: int) -> tuple[dict[str, torch.Tensor], StepsResult]:
        """The cloud's mean gradient: every rank's backward passes go through DDP, which
        averages them across the ranks, so the gradient rank 0 reads is the mean over every
        rank's slice of every batch (the gradient of one rank with the whole batch)."""
        return self._phase("gradient", steps, lambda: super(GroupTrainer, self).gradient(steps))

    def _phase(self, kind: str, steps: int, run: Callable[[], tuple[Any, StepsResult]]) -> tuple[Any, StepsResult]:
        """One phase of ``kind`` on every rank (the others run theirs on the command), with the
        cloud's figures: every rank's sequences and tokens, the mean of their losses."""
        with self._group:
            command([kind, steps])
            self._in_phase = True
            try:
                out, result = run()
            finally:
                self._in_phase = False
            loss = mean_over_ranks(result.mean_loss)
        world = dist.get_world_size()
        return out, replace(
            result, mean_loss=loss, sequences=result.sequences * world,
            tokens=result.tokens * world, replicas=world,
        )  # fmt: skip

    def release(self) -> None:
        """The phases are over: the other ranks leave the group."""
        with self._group:
            command(["stop"])


class FollowerTrainer(LocalTrainer):
    """A rank > 0: mirrors rank 0's steps (see :class:`GroupTrainer`). ``private_step``: this
    rank's DP-SGD (``fedjet.worker.private.follower_step``) when the job has ``--dp``."""

    private_step: Any = None
    sharded = False
    heldout: np.ndarray | None = None  # the cloud's held-out windows: a sharded group evaluates together

    def _private_phase(self, steps: int) -> None:
        """Rank 0's DP-SGD phase, step for step, until it says stop."""
        if self.private_step is None:
            raise ConfigError("rank 0 runs DP-SGD but this rank has no DP step")
        self.model.train()
        self.run_steps(steps, self.private_step.step)

    def _go(self) -> bool:
        (go,) = command()
        return bool(go)

    def _before_step(self) -> bool:
        go, corrected = command()
        if corrected:
            if self.sharded:  # rank 0 reads the weights, adds its corrections and loads them
                gather_full(self.job_model.trainable())
            self._receive_weights()
        return bool(go)

    def _receive_weights(self) -> None:
        if self.sharded:
            scatter_full(self.job_model.trainable(), None)
            return
        tensors = {n: t.detach().clone() for n, t in self.weights().items()}
        broadcast_weights(tensors)
        LocalTrainer.load(self, tensors)

    def follow(self) -> None:
        """Until rank 0 says stop: train phases and take weight changes as it does."""
        while True:
            message = command()
            if message[0] == "train":
                mean_over_ranks(self.train(int(message[1])).mean_loss)  # type: ignore[call-overload]
            elif message[0] == "gradient":
                _, result = self.gradient(int(message[1]))  # type: ignore[call-overload]
                mean_over_ranks(result.mean_loss)
            elif message[0] == "load":
                self._receive_weights()
            elif message[0] == "idle":  # rank 0 waits for a version: keep waiting
                continue
            elif message[0] == "gather":
                gather_full(self.job_model.trainable())
            elif message[0] == "eval":
                if self.heldout is None:
                    raise ConfigError("rank 0 evaluates the sharded model but this rank has no held-out windows")
                evaluate_sharded(self, self.heldout)
            elif message[0] == "dp_train":
                self._private_phase(int(message[1]))  # type: ignore[call-overload]
            else:
                return
