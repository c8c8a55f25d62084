"""``fedjet worker --nproc-per-node N``: the worker process is rank 0 of its cloud's group and
starts ranks 1..N-1 itself, each a fresh process that builds the same model and data and follows
rank 0's phases (:mod:`fedjet.worker.ranks`). Rank 0 alone speaks NATS.

Started under ``torchrun`` instead (``torchrun --nproc-per-node N -m fedjet worker ...``), every
rank is the same command: the launcher's environment says where each sits; rank 0 runs the
worker, joins the group at the launcher's rendezvous (``env://``) and hands the other ranks the
job's spec, which they then follow exactly as ranks started by the worker do."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedjet.errors import ConfigError
from fedjet.log import get_logger

log = get_logger("fedjet.worker")


@dataclass(frozen=True, kw_only=True)
class RankSettings:
    """What a rank > 0 needs to build its replica: everything else comes from the spec."""

    cloud: str
    data: str | None
    deal: bool
    model: str | None
    device: str | None
    precision: str | None
    shard: bool = False


@dataclass
class Ranks:
    """The other ranks of this cloud's group, and the rendezvous they met at."""

    world: int
    init_method: str
    directory: Path
    processes: list[Any] = field(default_factory=list)

    def stop(self, timeout_s: float = 30.0) -> None:
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(5)
        shutil.rmtree(self.directory, ignore_errors=True)

    def lost_within(self, seconds: float) -> list[int]:
        """:meth:`lost`, waiting up to ``seconds`` for a dying rank to be seen dead."""
        deadline = time.monotonic() + seconds
        while not (lost := self.lost()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return lost

    def lost(self) -> list[int]:
        """Ranks whose process has died (a dead rank ends the group's next step)."""
        return [rank for rank, p in enumerate(self.processes, start=1) if p.exitcode not in (None, 0)]


def start_ranks(world: int, spec_bytes: bytes, settings: RankSettings) -> Ranks:
    """Ranks 1..world-1 as fresh processes meeting rank 0 at a file rendezvous."""
    if world < 2:
        raise ConfigError(f"a group of ranks needs --nproc-per-node >= 2, got {world}")
    directory = Path(tempfile.mkdtemp(prefix="fedjet-ranks-"))
    ranks = Ranks(world=world, init_method=f"file://{directory / 'group'}", directory=directory)
    context = multiprocessing.get_context("spawn")
    for rank in range(1, world):
        process = context.Process(
            target=follow_main, args=(rank, world, ranks.init_method, spec_bytes, settings), daemon=True
        )
        process.start()
        ranks.processes.append(process)
    log.info("ranks_started", world=world)
    return ranks


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for env://


def launched_place() -> Any:
    """This process's :class:`~fedjet.worker.ranks.RankPlace` when a launcher (``torchrun``)
    started it as one of several ranks; None when it runs alone."""
    from fedjet.worker.ranks import RankPlace

    if not all(name in os.environ for name in LAUNCHER_ENV):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError as e:
        raise ConfigError(f"the launcher's RANK / WORLD_SIZE are not numbers: {e}") from e
    return RankPlace(rank, world) if world > 1 else None


MAX_SPEC_BYTES = 16 << 20


def send_spec(spec_bytes: bytes, device: Any) -> None:
    """Rank 0 of a launched group: the job's spec to every other rank (they cannot read it), as
    a size and a byte tensor (no pickle crosses the group)."""
    import torch
    import torch.distributed as dist

    dist.broadcast(torch.tensor([len(spec_bytes)], dtype=torch.int64, device=device), src=0)
    dist.broadcast(torch.frombuffer(bytearray(spec_bytes), dtype=torch.uint8).to(device), src=0)


def receive_spec(device: Any) -> bytes:
    import torch
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if not 0 < int(size) <= MAX_SPEC_BYTES:
        raise ConfigError(f"rank 0 sent a spec of {int(size)} bytes")
    spec = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(spec, src=0)
    return bytes(spec.cpu().numpy())


def follow_main(rank: int, world: int, init_method: str, spec_bytes: bytes, settings: RankSettings) -> None:
    """A rank > 0 started by the worker: the spec came with it."""
    from fedjet.worker.ranks import RankPlace

    _follow(RankPlace(rank, world), init_method, settings, spec_bytes)


def follow_launched(place: Any, settings: RankSettings) -> None:
    """A rank > 0 started by ``torchrun``: it joins at the launcher's rendezvous and is handed
    the spec by rank 0 (which reads it from NATS once the job is there)."""
    _follow(place, "env://", settings, None)


def _follow(place: Any, init_method: str, settings: RankSettings, spec_bytes: bytes | None) -> None:
    """A rank > 0: the same replica as rank 0, its own slice of every batch, rank 0's phases."""
    import torch.distributed as dist

    from fedjet.models.build import pick_device
    from fedjet.models.job_model import job_model_for
    from fedjet.spec import JobSpec
    from fedjet.worker.local_data import cloud_data, cloud_sampler
    from fedjet.worker.private import follower_step
    from fedjet.worker.ranks import FollowerTrainer, RankSlice, data_parallel, join_group, shard_model

    device = join_group(place, init_method, pick_device(settings.device))
    try:
        spec = JobSpec.from_bytes(receive_spec(device) if spec_bytes is None else spec_bytes)
        job_model = job_model_for(spec, settings.model)
        data = cloud_data(settings.data, job_model.tokenizer, spec, settings.cloud, deal=settings.deal)
        rows: Any = RankSlice(cloud_sampler(data, spec, settings.cloud, place.world), place)  # this rank's rows
        if settings.shard:
            shard_model(job_model.model)  # as rank 0 does, before the optimizer
        trainer = FollowerTrainer(job_model, rows, spec.config.train, device, precision=settings.precision)
        if settings.shard:
            trainer.sharded, trainer.heldout = True, data.heldout
        else:
            trainer.model = data_parallel(trainer.model, device)
        if spec.config.dp_config is not None:
            trainer.private_step = follower_step(spec, data, trainer, place)
        trainer.follow()
    finally:
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """A rank whose group has ended exits here, without tearing its objects down: freeing the
    DDP model right after the last broadcast can deadlock inside torch (the reducer's process
    group joins a gloo thread that waits for the GIL to free that broadcast's tensors), and a
    rank that never exits hangs its launcher (or ``fedjet up``). Rank 0 too, once its worker is
    done and has reported; nothing of a rank outlives it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0)
