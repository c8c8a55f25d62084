"""Central DP's randomness on real processes: whoever holds the job spec cannot redraw the noise.

Two ``fedjet up`` jobs with the same seed and data must export different models (the noise is
fresh CSPRNG output). The noise key is recorded sealed to the coordinator: ``replay --verify``
reproduces every version with the coordinator's key, and a member's key opens the record without
any cloud's loss or the noise key. (DP-SGD's twin runs are in test_privacy_job.py, the plain
twins that stay identical in test_e2e_up.py.)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.codecs.frame import Limits
from fedjet.codecs.withheld import coordinator_only
from fedjet.errors import AuthenticationError
from fedjet.keystore import member_boxes
from tests.conftest import run_fedjet
from tests.twin_runs import FLOAT_ORDER, largest_difference, run_side_by_side

pytestmark = pytest.mark.e2e

TINY = ["--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "512",
        "--codec", "dense", "--seed", "0", "--quiet"]  # fmt: skip


def run_pair(tmp_path: Path, data_dir: Path, name: str, *extra: str, first_job: tuple[str, ...] = ()) -> list[Path]:
    """Two jobs with the same seed, data and flags, run side by side; their exported models.
    ``first_job``: more arguments for the first one only (e.g. ``--job J --store DIR``)."""
    saved = [tmp_path / f"{name}-{i}" for i in range(2)]
    runs = []
    for out in saved:
        job = ("--job", f"{name}-{uuid.uuid4().hex[:6]}") if out is not saved[0] or not first_job else first_job
        runs.append(["up", *job, "--data", str(data_dir), "--save", str(out), *TINY, *extra])
    run_side_by_side(runs, timeout=240)
    return saved


def test_central_dp_noise_is_fresh_recorded_for_the_coordinator_and_hidden_from_members(tmp_path, data_dir):
    store, job = tmp_path / "store", f"cdp-{uuid.uuid4().hex[:6]}"
    recorded = ("--job", job, "--store", str(store))
    first, second = run_pair(tmp_path, data_dir, "central", "--central-dp", "clip=1,noise=0.5", first_job=recorded)
    assert largest_difference(first, second) > 100 * FLOAT_ORDER
    verified = run_fedjet("replay", "--store", str(store), "--job", job, "--verify", "--no-progress", timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout.strip().splitlines()[-1])["mismatches"] == 0
    record = asyncio.run(_record_as_member(store, job, "aws", version=1))
    assert record.contributions and all(c.loss == 0.0 and c.heldout_loss is None for c in record.contributions)
    assert record.train_loss is None and record.coordinator_only
    with pytest.raises(AuthenticationError):
        coordinator_only(record, member_boxes(store / "keys", "aws").me.box)


async def _record_as_member(store: Path, job: str, cloud: str, *, version: int):
    server = EmbeddedNatsServer(store)
    nc = await connect(server.start(), "member-reader")
    try:
        follower = GlobalFollower(nc.jetstream(), JobSubjects(job), member_boxes(store / "keys", cloud), Limits())
        async for signed in follower.recorded_heads():
            if signed.head.version == version:
                return follower.record(signed.head)
        raise AssertionError(f"version {version} of {job} is not recorded")
    finally:
        await close_quietly(nc)
        server.stop()
