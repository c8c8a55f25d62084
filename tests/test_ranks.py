"""A cloud on several ranks: two gloo ranks of batch b take the same steps as one rank of batch
2b on the same data (the training core of ``fedjet.worker.ranks``; real processes, real model,
real WikiText bytes)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedjet.config.job import JobConfig, TrainConfig
from fedjet.data.batches import BatchSampler
from fedjet.errors import ConfigError
from fedjet.models.job_model import initial_job_model
from fedjet.worker.ranks import FollowerTrainer, GroupTrainer, RankPlace, RankSlice, data_parallel, join_group
from fedjet.worker.train import LocalTrainer

B, SEQ, STEPS = 4, 64, 3


def _tokens(data_dir: Path) -> np.ndarray:
    return np.frombuffer((data_dir / "wiki.valid.tokens").read_bytes()[:300_000], dtype=np.uint8).astype(np.int64)


def _leave_group() -> None:
    """A rank's end as the worker's ranks end: out of the group, then out of the process without
    tearing torch's objects down (freeing a DDP model after the last collective can deadlock in
    torch's gloo teardown, and the test would wait on a rank that never exits)."""
    torch.distributed.destroy_process_group()
    os._exit(0)


def _trainer(batch: int, kind: type[LocalTrainer] = LocalTrainer, peft: str | None = None) -> LocalTrainer:
    job = JobConfig(model="tiny", peft=peft, train=TrainConfig(batch_size=batch, seq_len=SEQ, lr=2e-3))
    return kind(initial_job_model(job), None, job.train, torch.device("cpu"))  # type: ignore[arg-type]


def _rank(rank: int, world: int, init: str, data_dir: Path, out: Path) -> None:
    """Rank 0 drives the phase as a worker does (``GroupTrainer``); the others follow it."""
    torch.set_num_threads(1)
    place = RankPlace(rank, world)
    join_group(place, init, torch.device("cpu"))
    trainer = _trainer(B, GroupTrainer if rank == 0 else FollowerTrainer)
    trainer.sampler = RankSlice(BatchSampler(_tokens(data_dir), SEQ, B * world, seed=7), place)  # type: ignore[assignment]
    trainer.model = data_parallel(trainer.model, torch.device("cpu"))
    if isinstance(trainer, GroupTrainer):
        result = trainer.train(STEPS)
        trainer.release()
        (out / "result.json").write_text(json.dumps({"loss": result.mean_loss, "tokens": result.tokens}))
    else:
        assert isinstance(trainer, FollowerTrainer)
        trainer.follow()
    torch.save({n: t.detach().clone() for n, t in trainer.weights().items()}, out / f"rank{rank}.pt")
    _leave_group()


def test_two_ranks_of_batch_b_take_the_steps_of_one_rank_of_batch_2b(tmp_path, data_dir):
    """Through the worker's own rank trainers: the same weights, and the phase's figures are
    the cloud's (tokens of both ranks, their mean loss), as the update claims them."""
    context = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [context.Process(target=_rank, args=(r, 2, init, data_dir, tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=180)
        assert process.exitcode == 0
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _trainer(2 * B)
    single.sampler = BatchSampler(_tokens(data_dir), SEQ, 2 * B, seed=7)
    start = {n: t.detach().clone() for n, t in single.weights().items()}
    alone = single.train(STEPS)
    cloud = json.loads((tmp_path / "result.json").read_text())
    assert cloud["tokens"] == alone.tokens  # the cloud's tokens, every rank's, not rank 0's share
    assert abs(cloud["loss"] - alone.mean_loss) < 1e-5  # the mean over the ranks' slices
    for name, expected in single.weights().items():
        assert torch.equal(rank0[name], rank1[name]), name  # the replicas stay equal
        assert torch.allclose(rank0[name], expected, atol=2e-6, rtol=1e-5), name
    moved = sum(float((single.weights()[n] - start[n]).abs().sum()) for n in start)
    assert moved > 1.0  # the steps did move the model: the comparison is not between two starts


def _gradient_rank(rank: int, init: str, data_dir: Path, out: Path) -> None:
    """The gradient strategy's phase: rank 0 reads the cloud's mean gradient; the other follows."""
    torch.set_num_threads(1)
    place = RankPlace(rank, 2)
    join_group(place, init, torch.device("cpu"))
    trainer = _trainer(B, GroupTrainer if rank == 0 else FollowerTrainer)
    trainer.sampler = RankSlice(BatchSampler(_tokens(data_dir), SEQ, B * 2, seed=3), place)  # type: ignore[assignment]
    trainer.model = data_parallel(trainer.model, torch.device("cpu"))
    if isinstance(trainer, GroupTrainer):
        gradient, result = trainer.gradient(STEPS)
        trainer.release()
        torch.save(gradient, out / "gradient.pt")
        (out / "result.json").write_text(json.dumps({"loss": result.mean_loss, "tokens": result.tokens}))
    else:
        assert isinstance(trainer, FollowerTrainer)
        trainer.follow()
    _leave_group()


def test_two_ranks_of_batch_b_send_the_mean_gradient_of_one_rank_of_batch_2b(tmp_path, data_dir):
    """The gradient strategy on a cloud of ranks: the one gradient rank 0 sends is the mean over
    every rank's slice of every batch, as one rank with the whole batch computes it."""
    context = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [context.Process(target=_gradient_rank, args=(r, init, data_dir, tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=180)
        assert process.exitcode == 0
    single = _trainer(2 * B)
    single.sampler = BatchSampler(_tokens(data_dir), SEQ, 2 * B, seed=3)
    expected, alone = single.gradient(STEPS)
    got = torch.load(tmp_path / "gradient.pt")
    cloud = json.loads((tmp_path / "result.json").read_text())
    assert cloud["tokens"] == alone.tokens
    assert abs(cloud["loss"] - alone.mean_loss) < 1e-5
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6, rtol=1e-4), name
    assert sum(float(v.abs().sum()) for v in expected.values()) > 1.0  # a real gradient, not zeros


def _sharded_steps(trainer: LocalTrainer, start: dict[str, torch.Tensor], windows: np.ndarray) -> dict[str, object]:
    """One cloud's life on a trainer: a version loaded, a correction arriving mid-phase, a
    phase, a held-out evaluation, a gradient phase; what the worker would read at each point."""
    trainer.load(start)
    loaded = {n: t.clone() for n, t in trainer.weights().items()}
    trainer.correct({n: torch.full_like(t, 1e-3) for n, t in start.items()})
    result = trainer.train(STEPS)
    trained = {n: t.clone() for n, t in trainer.weights().items()}
    heldout = trainer.evaluate(windows).loss
    gradient, _ = trainer.gradient(2)
    return {"loaded": loaded, "trained": trained, "loss": result.mean_loss, "heldout": heldout, "gradient": gradient}


def _start(data_dir: Path, peft: str | None) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    torch.manual_seed(5)
    start = {n: t + 0.01 * torch.randn_like(t) for n, t in _trainer(B, peft=peft).weights().items()}
    return start, _tokens(data_dir)[: 6 * SEQ].reshape(6, SEQ)


def _sharded_rank(rank: int, init: str, data_dir: Path, out: Path, peft: str | None) -> None:
    from fedjet.worker.ranks import shard_model

    torch.set_num_threads(1)
    place = RankPlace(rank, 2)
    join_group(place, init, torch.device("cpu"))
    job = JobConfig(model="tiny", peft=peft, train=TrainConfig(batch_size=B, seq_len=SEQ, lr=2e-3))
    job_model = initial_job_model(job)
    assert shard_model(job_model.model) == 4  # the tiny preset's four blocks, each on its own
    kind = GroupTrainer if rank == 0 else FollowerTrainer
    trainer = kind(job_model, None, job.train, torch.device("cpu"))  # type: ignore[arg-type]
    trainer.sampler = RankSlice(BatchSampler(_tokens(data_dir), SEQ, B * 2, seed=11), place)  # type: ignore[assignment]
    trainer.sharded = True
    start, windows = _start(data_dir, peft)
    if isinstance(trainer, GroupTrainer):
        torch.save(_sharded_steps(trainer, start, windows), out / "sharded.pt")
        trainer.release()
    else:
        assert isinstance(trainer, FollowerTrainer)
        trainer.heldout = windows
        trainer.follow()
    _leave_group()


@pytest.mark.parametrize("peft", [None, "lora:r=4,dropout=0"])
def test_a_sharded_cloud_of_two_ranks_trains_loads_corrects_and_evaluates_as_one_rank_of_batch_2b(
    tmp_path, data_dir, peft
):
    """``--shard`` (FSDP2): no rank holds the whole model, yet what rank 0 reads (the loaded
    weights, the trained ones, the held-out loss, the gradient) is what one rank with the
    whole batch gets, a correction mid-phase included; with LoRA, its adapters alone."""
    context = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [context.Process(target=_sharded_rank, args=(r, init, data_dir, tmp_path, peft)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)
        assert process.exitcode == 0
    got = torch.load(tmp_path / "sharded.pt")
    single = _trainer(2 * B, peft=peft)
    single.sampler = BatchSampler(_tokens(data_dir), SEQ, 2 * B, seed=11)
    start, windows = _start(data_dir, peft)
    expected = _sharded_steps(single, start, windows)
    for name, value in start.items():
        assert torch.equal(got["loaded"][name], value), name  # loaded exactly, every shard
    for name, value in expected["trained"].items():
        assert torch.allclose(got["trained"][name], value, atol=5e-6, rtol=1e-4), name
    assert abs(got["loss"] - expected["loss"]) < 1e-5
    assert abs(got["heldout"] - expected["heldout"]) < 1e-5
    for name, value in expected["gradient"].items():
        assert torch.allclose(got["gradient"][name], value, atol=1e-6, rtol=1e-4), name
    moved = sum(float((expected["trained"][n] - start[n]).abs().sum()) for n in start)
    assert moved > (0.05 if peft else 1.0)  # the steps moved the model (LoRA: its few adapters)
    assert all(".lora_" in n for n in start) if peft else len(start) > 40


def _waiting_rank(rank: int, init: str, data_dir: Path, out: Path, keep_alive: bool) -> None:
    """Rank 0 trains a phase, then waits (for a version, in a worker) three collective timeouts
    long, keeping the other rank alive or not, then trains again."""
    torch.set_num_threads(1)
    place = RankPlace(rank, 2)
    join_group(place, init, torch.device("cpu"))
    trainer = _trainer(2, GroupTrainer if rank == 0 else FollowerTrainer)
    trainer.sampler = RankSlice(BatchSampler(_tokens(data_dir), SEQ, 4, seed=1), place)  # type: ignore[assignment]
    trainer.model = data_parallel(trainer.model, torch.device("cpu"))
    if isinstance(trainer, GroupTrainer):
        trainer.train(1)
        deadline = time.monotonic() + 3 * float(os.environ["FEDJET_RANK_TIMEOUT_S"])
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if keep_alive:
                assert trainer.keep_alive()
        trainer.train(1)
        trainer.release()
    else:
        assert isinstance(trainer, FollowerTrainer)
        trainer.follow()
    (out / f"done{rank}").write_text("ok")
    _leave_group()


def test_the_other_ranks_outlive_a_wait_longer_than_the_collective_timeout(tmp_path, data_dir, monkeypatch):
    """A worker waits for a version as long as the other clouds take; its ranks wait for the
    next command in a collective that would time out: rank 0's keep-alives keep them there."""
    monkeypatch.setenv("FEDJET_RANK_TIMEOUT_S", "3")
    context = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [context.Process(target=_waiting_rank, args=(r, init, data_dir, tmp_path, True)) for r in range(2)]
    done = [tmp_path / "done0", tmp_path / "done1"]  # written once the second phase is over
    try:
        for process in ranks:
            process.start()
        deadline = time.monotonic() + 120
        while not all(d.exists() for d in done) and time.monotonic() < deadline:
            assert all(p.exitcode in (None, 0) for p in ranks), [p.exitcode for p in ranks]  # a rank timed out
            time.sleep(0.2)
    finally:
        for process in ranks:  # done: their teardown is not what is tested
            process.kill()
            process.join()
    assert all(d.exists() for d in done)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(data_dir):
    with pytest.raises(ConfigError, match="does not split"):
        RankSlice(BatchSampler(_tokens(data_dir), SEQ, 5, seed=0), RankPlace(0, 2))
    with pytest.raises(ConfigError, match=r"not in 0\.\.1"):
        RankPlace(2, 2)


@pytest.mark.e2e
def test_a_sharded_cloud_of_two_ranks_learns_replays_and_a_killed_rank_ends_its_worker_cleanly(tmp_path, data_dir):
    """``fedjet up --nproc-per-node 2 --shard``: each cloud's worker starts a second rank, the
    two hold half the model each (FSDP2), and the job learns; then one cloud's extra rank is
    SIGKILLed: that worker stops with ``rank_lost`` (not a hang, not a traceback), ``fedjet up``
    exits non-zero, every process of the run is gone, and every version recorded before the kill
    replays bit for bit."""
    import signal
    import time
    import uuid

    from tests.conftest import TAG_ENV, FedjetProcess, processes_tagged, wait_until_gone

    tag = f"ranks-{uuid.uuid4().hex[:8]}"
    args = ["up", "--nproc-per-node", "2", "--shard", "--rounds", "200", "--local-steps", "4", "--batch-size", "4"]
    args += ["--seq-len", "64", "--codec", "dense", "--eval-tokens", "1024", "--data", str(data_dir)]
    store = tmp_path / "store"
    args += ["--store", str(store)]
    up = FedjetProcess(*args, env={TAG_ENV: tag}, log=tmp_path / "up.log")
    try:
        deadline = time.monotonic() + 180
        while "round   2" not in (tmp_path / "up.log").read_text(errors="replace"):
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        ranks = [pid for pid in processes_tagged(tag) if b"spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(ranks) == 3, ranks  # one extra rank per cloud
        os.kill(ranks[0], signal.SIGKILL)
        assert up.wait(timeout=120) != 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    output = (tmp_path / "up.log").read_text(errors="replace")
    kept = output.rsplit("logs kept in ", 1)[-1].split()[0]
    logs = "".join(p.read_text(errors="replace") for p in Path(kept).glob("worker-*.log"))
    assert '"rank_lost"' in logs and "died; restart the worker" in logs, output[-3000:]  # named, no traceback
    assert "Traceback" not in logs
    assert wait_until_gone(processes_tagged(tag), timeout=30) == []
    losses = [float(line.split("eval_loss")[1].split()[0]) for line in output.splitlines() if line.startswith("round")]
    assert len(losses) >= 3 and losses[2] < losses[0] - 1.0, output[-2000:]  # it learned before the kill
    update_mb = 4 * sum(t.numel() for t in initial_job_model(JobConfig(model="tiny")).exchanged().values()) / 1e6
    ups = [float(line.split(" up ")[1].split()[0]) for line in output.splitlines() if line.startswith("round   2")]
    assert ups and 2.5 * update_mb < ups[0] < 3.5 * update_mb, (ups, update_mb)  # one update per cloud, not per rank
    from tests.conftest import run_fedjet

    verify = run_fedjet("replay", "--store", str(store), "--verify", "--no-progress", timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replayed = json.loads(verify.stdout.strip().splitlines()[-1])
    assert replayed["versions"] >= 2 and replayed["mismatches"] == 0, replayed


def test_fedjet_up_checks_its_ranks_flag_before_any_process_starts():
    from fedjet.config.flags import job_config
    from fedjet.runner.up import UpConfig

    assert UpConfig(job=job_config(overrides={"strategy": {"name": "gradient"}}), nproc_per_node=2).nproc_per_node == 2
    assert UpConfig(job=job_config(), nproc_per_node=2, shard=True).shard
    with pytest.raises(ConfigError, match="--nproc-per-node >= 2"):
        UpConfig(job=job_config(), shard=True)
    with pytest.raises(ConfigError, match="DP-SGD"):
        UpConfig(job=job_config(overrides={"dp": "epsilon=8,delta=1e-5,clip=1.0"}), nproc_per_node=2, shard=True)
    with pytest.raises(ConfigError, match="wait schedule"):
        UpConfig(job=job_config(overrides={"train": {"schedule": "overlap"}}), nproc_per_node=2, shard=True)
    assert (
        UpConfig(job=job_config(overrides={"dp": "epsilon=8,delta=1e-5,clip=1.0"}), nproc_per_node=2).nproc_per_node
        == 2
    )
    with pytest.raises(ConfigError, match=">= 1"):
        UpConfig(job=job_config(), nproc_per_node=0)
    assert UpConfig(job=job_config(), nproc_per_node=2).nproc_per_node == 2


def test_a_rank_gets_a_device_of_its_own_and_cpu_ranks_share_the_cores(monkeypatch):
    from fedjet.worker.ranks import rank_device

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert rank_device(torch.device("cpu"), RankPlace(1, 2)) == torch.device("cpu")
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every thread's default is one thread")
def test_a_phase_on_a_pool_thread_trains_with_the_processs_thread_count():
    """OpenMP's thread count is per thread: a worker's phase runs on its event loop's pool,
    where it started at every core while the rank's main thread had set cores / ranks."""
    import ctypes
    import glob
    import threading

    from fedjet.worker.train import threads_here

    runtimes = glob.glob(os.path.join(torch.__path__[0], "lib", "libgomp*.so*"))
    if not runtimes:
        pytest.skip("this torch build has no libgomp of its own")
    omp = ctypes.CDLL(runtimes[0])
    before, seen = torch.get_num_threads(), {}

    def on_a_fresh_thread() -> None:
        seen["default"] = omp.omp_get_max_threads()
        threads_here()
        seen["applied"] = omp.omp_get_max_threads()

    torch.set_num_threads(1)
    try:
        thread = threading.Thread(target=on_a_fresh_thread)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert seen["default"] > 1  # what the thread would have trained with
    assert seen["applied"] == 1


def _private_rank(rank: int, init: str, data_dir: Path, out: Path) -> None:
    """One rank of a cloud's DP-SGD gradient: its own examples clipped here, the noise added by
    rank 0 only, the sums added over the ranks; once with noise, once without (same examples)."""
    from fedjet.privacy.dpsgd import private_gradient
    from fedjet.privacy.secure_random import SecureRandom
    from fedjet.worker.ranks import sum_over_ranks

    torch.set_num_threads(1)
    join_group(RankPlace(rank, 2), init, torch.device("cpu"))
    model = _trainer(2).model.eval()  # no dropout: the two calls see the same per-example gradients
    tokens = _tokens(data_dir)
    windows = torch.from_numpy(tokens[: 6 * (SEQ + 1)].reshape(6, SEQ + 1))[rank * 3 : rank * 3 + 3]
    kwargs = {"expected_batch": 6.0, "sum_over_ranks": sum_over_ranks, "adds_noise": rank == 0}
    noisy, _ = private_gradient(model, windows, 1.0, 1.0, SecureRandom(), **kwargs)  # type: ignore[arg-type]
    clean, _ = private_gradient(model, windows, 1.0, 0.0, SecureRandom(), **kwargs)  # type: ignore[arg-type]
    torch.save({"noisy": noisy, "clean": clean}, out / f"dp{rank}.pt")
    _leave_group()


def test_dp_sgd_across_ranks_adds_the_noise_once_to_the_cloud_sum_and_every_rank_gets_it(tmp_path, data_dir):
    """Per-example clipping on every rank, N(0, (σ·C)²) drawn once (on rank 0, from its CSPRNG)
    and added to the sum over the ranks: the noise in the cloud's gradient has σ·C per
    coordinate (noise on every rank would give √2·σ·C), and both ranks hold the same gradient."""
    context = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [context.Process(target=_private_rank, args=(r, init, data_dir, tmp_path)) for r in range(2)]
    try:
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=180)
    finally:
        for process in ranks:
            process.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    zero, one = (torch.load(tmp_path / f"dp{r}.pt") for r in range(2))
    for name in zero["noisy"]:
        assert torch.equal(zero["noisy"][name], one["noisy"][name]), name
        assert torch.equal(zero["clean"][name], one["clean"][name]), name
    noise = torch.cat([(zero["noisy"][n] - zero["clean"][n]).flatten() * 6.0 for n in zero["noisy"]])
    assert noise.numel() > 100_000
    assert abs(float(noise.std()) - 1.0) < 0.02  # σ·C = 1, once
    clean = torch.cat([zero["clean"][n].flatten() for n in zero["clean"]])
    assert float(clean.norm()) * 6.0 <= 6.0 + 1e-4 and float(clean.norm()) > 0  # six examples, each clipped to 1


def test_a_cloud_started_under_torchrun_is_one_party_of_two_ranks_and_a_flag_that_disagrees_fails(
    tmp_path, nats_url, data_dir
):
    """``torchrun --nproc-per-node 2 -m fedjet worker ...`` for aws: rank 0 reads the spec from
    NATS and hands it to rank 1 over the group; the job runs its rounds with one aws update per
    round (one party, not two), every process exits 0, and the run replays bit for bit."""
    import socket
    import subprocess
    import sys

    from fedjet.keystore import generate
    from tests.conftest import FedjetProcess, run_fedjet

    keys, job = tmp_path / "keys", "launched"
    generate(str(keys), ["aws", "gcp", "eval"])
    common = ["--nats", nats_url, "--keys", str(keys), "--job", job]
    coordinator = FedjetProcess(
        "coordinator", *common, "--clouds", "aws,gcp", "--rounds", "2", "--local-steps", "2", "--batch-size", "4",
        "--seq-len", "64", "--codec", "dense", "--model", "tiny", log=tmp_path / "coordinator.log",
    )  # fmt: skip
    worker = ["worker", *common, "--data", str(data_dir), "--deal", "--wait-spec", "60"]
    gcp = FedjetProcess(*worker, "--cloud", "gcp", log=tmp_path / "gcp.log")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    launcher += ["--master-port", str(port), "-m", "fedjet", *worker, "--cloud", "aws"]
    with open(tmp_path / "aws.log", "w") as log:
        aws = subprocess.Popen(
            launcher, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"}
        )
    try:
        assert coordinator.wait(timeout=300) == 0, coordinator.errors()[-3000:]
        assert aws.wait(timeout=120) == 0, (tmp_path / "aws.log").read_text()[-3000:]
        assert gcp.wait(timeout=120) == 0
    finally:
        for proc in (aws, gcp, coordinator):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = (tmp_path / "coordinator.log").read_text().splitlines()
    applied = [json.loads(line)["cloud"] for line in lines if '"update_applied"' in line]
    assert sorted(applied) == ["aws", "aws", "gcp", "gcp"], applied  # one aws update a round, from two ranks
    assert "worker_ready" in (tmp_path / "aws.log").read_text()
    verify = run_fedjet("replay", "--nats", nats_url, "--keys", str(keys), "--job", job, "--verify", "--no-progress")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout.strip().splitlines()[-1])["mismatches"] == 0
    refused = run_fedjet(
        "worker", *common, "--cloud", "aws", "--nproc-per-node", "2",
        env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
    )  # fmt: skip
    assert refused.returncode != 0 and "leave out --nproc-per-node" in refused.stdout + refused.stderr
