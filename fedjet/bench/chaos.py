"""``fedjet bench chaos``: a real job while its servers fail, then an audit of the recording.

A nats-server with JetStream on loopback, the coordinator and one worker per cloud run as
separate processes, as in production. While the job runs the coordinator is SIGKILLed ``K``
times at random moments (and restarted with the same command), the nats-server is stopped with
SIGTERM and started again on the same store and port, and workers are SIGKILLed and restarted.
When the job has finished, the recording is read back and every update a worker sent is
accounted for; ``fedjet replay --verify`` then re-applies every version.

The audit, on the coordinator's key (so it opens what the coordinator opened), counts what was
sent, applied, rejected, lost and doubled: :mod:`~fedjet.bench.chaos_audit` says how. The
harness is :mod:`~fedjet.bench.chaos_cluster`, the scenario :mod:`~fedjet.bench.chaos_events`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedjet.bench.chaos_audit import audit, describe, healthy, verify_by_replay
from fedjet.bench.chaos_cluster import Cluster, HeadWatcher
from fedjet.bench.chaos_config import ChaosConfig, ChaosFailed, config_from
from fedjet.bench.chaos_events import ChaosRun, drive
from fedjet.bench.chaos_flags import build_parser
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import COORDINATOR
from fedjet.keystore import generate, load_public
from fedjet.log import configure_logging

__all__ = ["ChaosConfig", "ChaosFailed", "config_from", "describe", "healthy", "main", "run"]


def run(config: ChaosConfig) -> dict[str, Any]:
    """Run the job under chaos and audit it; the dict is what ``describe`` and the CLI print."""
    root = Path(config.out) if config.out else Path(tempfile.mkdtemp(prefix="fedjet-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        result = asyncio.run(_run(config, root))
        ok = True
        return result
    finally:
        if config.out is None and ok:
            shutil.rmtree(root, ignore_errors=True)
        elif config.out is None:
            print(f"chaos: logs kept in {root / 'logs'}", file=sys.stderr)


async def _run(config: ChaosConfig, root: Path) -> dict[str, Any]:
    started = time.monotonic()
    cluster = Cluster(config, root)
    generate(cluster.keys, [*config.clouds, "eval"])
    subjects = JobSubjects(config.job)
    try:
        cluster.start_nats()
        cluster.spawn_coordinator()
        for cloud in config.clouds:
            cluster.spawn_worker(cloud)
        watcher = HeadWatcher(cluster.url, subjects, load_public(cluster.keys, COORDINATOR))
        await watcher.open()
        try:
            run_ = ChaosRun(config, cluster, watcher, started + config.timeout_s)
            await drive(run_)
        finally:
            await watcher.close()
        job_s = time.monotonic() - started
        result = await audit(cluster.url, subjects, str(cluster.keys), cluster.logs)
        replay = await asyncio.to_thread(
            verify_by_replay, cluster.url, config.job, str(cluster.keys), cli=config.replay_cli
        )
        result |= {"replay_mismatches": replay["mismatches"], "replay_first_mismatch": replay["first_mismatch"]}
    finally:
        cluster.stop()
    result |= {
        "coordinator_kills": run_.counts["coordinator"],
        "nats_restarts": run_.counts["nats"],
        "worker_kills": run_.counts["worker"],
        "rank_kills": run_.counts["rank"],
        "rank_lost_exits": run_.counts["rank_lost_exits"],  # workers that stopped, naming the lost rank
        "planned": config.counts,  # more than happened: the job finished first (give more --rounds)
        "crashes": cluster.crashes,
        "starts": dict(cluster.started),
        "strategy": config.strategy,
        "rounds": config.target_rounds,
        "seed": config.seed,
        "job_s": round(job_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    """JSON on stdout, one line for people on stderr; exit 1 unless the run was healthy."""
    configure_logging(os.environ.get("FEDJET_LOG_LEVEL", "error"))  # this driver's reconnects are expected
    config = config_from(build_parser().parse_args(argv))
    try:
        result = run(config)
    except ChaosFailed as e:
        print(f"chaos FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    print(describe(result), file=sys.stderr)
    return 0 if healthy(result) else 1


if __name__ == "__main__":
    sys.exit(main())
