"""``fedjet bench chaos``, the report: an audit of the recording and its verdict.

The audit, on the coordinator's key (so it opens what the coordinator opened):

* ``sent``: update blobs in the UPDATES stream that authenticate (a member's key on its own
  subject), each identified by (cloud, worker, seq) and placed at its last chunk's stream seq.
* ``applied``: contributions over all version records; ``doubled``: extra appearances of one
  (cloud, worker, seq) in the records (the same update applied in two versions, or twice in one).
* ``rejected``: the newest record's counts per reason. The records also list each rejection's
  stream seq (``dropped``, at most 64 per version); ``rejected_recounted`` counts stream seqs
  listed in two versions (a rejection counted again after a restart).
* ``lost``: sent updates placed before the newest record's ``resume_from`` (the coordinator's
  claim that everything before it is decided) that no record applies and no record lists as
  rejected. Exact while no record hit the 64-entry list cap (``rejected_listed_complete``);
  otherwise an upper bound.
* ``undecided_at_end``: sent updates at or after ``resume_from``, neither applied nor rejected:
  never read because the job ended first (sent while the final version was made; with
  ``async``, also the backlog that workers built up while the coordinator was down).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedjet.bench.chaos_config import ChaosFailed
from fedjet.broker.blobs import BlobAssembler
from fedjet.broker.jetstream import close_quietly, connect, read_range
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.recorded import coordinator_view
from fedjet.codecs.crypto import envelope_limit
from fedjet.codecs.frame import Limits
from fedjet.codecs.record import VersionRecord
from fedjet.coordinator.admission import Admission
from fedjet.errors import FedjetError

LISTED_PER_VERSION = 64  # fedjet.coordinator.record.MAX_DROPPED_LISTED


def verify_by_replay(url: str, job: str, keys: str, *, cli: bool = True) -> dict[str, Any]:
    """``fedjet replay --verify`` as a user runs it, and its JSON line; ``cli`` False calls the
    function behind the command in this process instead (the same result, one start fewer)."""
    if not cli:
        from fedjet.runner.replay import ReplayConfig, verify_recording

        config = ReplayConfig(nats_url=url, job=job, keys=keys, verify=True, progress=False)
        return verify_recording(config).to_dict()
    args = ["replay", "--nats", url, "--job", job, "--keys", keys, "--verify", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "fedjet", *args], capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ChaosFailed(f"replay --verify printed no result (exit {done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


@dataclass
class Records:
    """Every version record, by version (the first head of a version counts, as in replay)."""

    records: dict[int, VersionRecord] = field(default_factory=dict)
    final: bool = False
    forked: int = 0  # a version announced twice with different weights


async def read_records(js: Any, subjects: JobSubjects, follower: GlobalFollower) -> Records:
    out, hashes = Records(), dict[int, str]()
    async for msg in read_range(js, subjects.global_stream, subjects.global_head):
        try:
            head = follower.parse_head(msg.data)
        except FedjetError:
            continue
        out.final = out.final or head.final
        if head.version in hashes:
            out.forked += int(hashes[head.version] != head.hash)
            continue
        hashes[head.version] = head.hash
        out.records[head.version] = follower.record(head)
    return out


@dataclass
class Sent:
    by_seq: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # stream seq -> (cloud, worker, seq)
    unauthenticated: int = 0
    partial_chunks: int = 0  # chunks of blobs that never completed (a worker killed mid-publish)
    partial_blobs: int = 0


async def read_sent(
    js: Any, subjects: JobSubjects, admission: Admission, *, stream: str | None = None, subject: str | None = None
) -> Sent:
    """Every update blob in the updates stream (or ``stream``/``subject``: an island's stream on
    its leaf), opened as the coordinator opens it (no anti-replay)."""
    limits = admission.limits
    assembler = BlobAssembler(
        max_blob_bytes=envelope_limit(limits.max_frame_bytes),
        max_pending_bytes=4 * envelope_limit(limits.max_frame_bytes),
        max_blobs_per_subject=1024,
    )
    out = Sent()
    async for msg in read_range(js, stream or subjects.update_stream, subject or subjects.updates, 1):
        try:
            blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream)
            if blob is None:
                continue
            update = await asyncio.to_thread(admission.open, blob.data, JobSubjects.cloud_of(blob.subject))
        except FedjetError:
            out.unauthenticated += 1
            continue
        h = update.header
        out.by_seq[blob.last_seq] = (h.cloud, h.worker, h.seq)
    out.partial_chunks = len(assembler.pending_seqs)
    out.partial_blobs = assembler.pending_blobs
    return out


def acknowledged_sends(logs: Path) -> set[tuple[str, str, int]]:
    """(cloud, worker, seq) of every update a worker logged as sent: JetStream acknowledged
    each of its chunks before the worker logs ``update_sent``."""
    acked: set[tuple[str, str, int]] = set()
    for path in sorted(logs.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"update_sent"' not in line:
                continue
            try:
                event = json.loads(line)
                acked.add((str(event["cloud"]), str(event["worker"]), int(event["seq"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a SIGKILL
    return acked


async def audit(url: str, subjects: JobSubjects, keys: str, logs: Path) -> dict[str, Any]:
    """Read the recording of a finished job and account for every update sent, cross-checked
    against what each worker's own log says JetStream acknowledged."""
    nc = await connect(url, "fedjet-chaos-audit")
    try:
        js = nc.jetstream()
        spec, boxes = await coordinator_view(js, subjects, keys)
        follower = GlobalFollower(js, subjects, boxes, Limits())
        recorded = await read_records(js, subjects, follower)
        sent = await read_sent(js, subjects, Admission(spec, boxes, Limits()))
    finally:
        await close_quietly(nc)
    if not recorded.records:
        raise ChaosFailed("the job recorded no versions")
    return account(recorded, sent, acknowledged_sends(logs))


def account(recorded: Records, sent: Sent, acknowledged: set[tuple[str, str, int]]) -> dict[str, Any]:
    """The numbers of the module docstring, from the records and the stream; an update a worker
    saw acknowledged that the stream does not hold was lost by the broker."""
    records = [recorded.records[v] for v in sorted(recorded.records)]
    newest = records[-1]
    applied = Counter((c.cloud, c.worker, c.seq) for r in records for c in r.contributions)
    listed = Counter(d.stream_seq for r in records for d in r.dropped)
    resume_from = newest.progress.resume_from
    open_ = {s: key for s, key in sent.by_seq.items() if key not in applied and s not in listed}
    return {
        "versions": max(recorded.records),
        "final": recorded.final,
        "sent": len(sent.by_seq),
        "applied": sum(applied.values()),
        "applied_total_recorded": newest.progress.applied_total,
        "rejected": dict(sorted(newest.progress.rejected.items())),
        "rejected_total": sum(newest.progress.rejected.values()),
        "rejected_listed_complete": all(len(r.dropped) < LISTED_PER_VERSION for r in records),
        "rejected_recounted": sum(n - 1 for n in listed.values()),
        "lost": sum(1 for s in open_ if s < resume_from),
        "lost_updates": [f"{c}/{w}/{q}@{s}" for s, (c, w, q) in sorted(open_.items()) if s < resume_from][:20],
        "doubled": sum(n - 1 for n in applied.values()),
        "undecided_at_end": sum(1 for s in open_ if s >= resume_from),
        "unauthenticated": sent.unauthenticated,
        "partial_chunks": sent.partial_chunks,
        "partial_blobs": sent.partial_blobs,
        "acknowledged": len(acknowledged),
        "acknowledged_missing": len(acknowledged - set(sent.by_seq.values())),
        "forked_versions": recorded.forked,
    }


def describe(result: dict[str, Any]) -> str:
    r = result
    rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none"
    verdict = "OK" if healthy(r) else "FAILED"
    return (
        f"chaos {verdict}: {r['versions']} versions{' (final)' if r['final'] else ''}, "
        f"{r['sent']} updates sent, {r['applied']} applied, {r['rejected_total']} rejected ({rejected}); "
        f"lost {r['lost']} (acknowledged yet missing {r['acknowledged_missing']} of {r['acknowledged']}), "
        f"doubled {r['doubled']}, unauthenticated {r['unauthenticated']}, partial blobs {r['partial_blobs']}, "
        f"replay mismatches {r['replay_mismatches']}, "
        f"crashes {len(r['crashes'])}; killed the coordinator {r['coordinator_kills']}x, "
        f"restarted nats {r['nats_restarts']}x, killed workers {r['worker_kills']}x, "
        f"killed ranks {r.get('rank_kills', 0)}x (planned {r['planned']['coordinator']}/{r['planned']['nats']}/"
        f"{r['planned']['worker']}/{r['planned'].get('rank', 0)}); {r['wall_s']:.0f}s"
    )


def healthy(result: dict[str, Any]) -> bool:
    """Nothing lost (by the records or by the workers' acknowledged sends), nothing doubled,
    nothing unauthenticated in the stream, no partial blob but one per killed worker or rank, every
    version replays, nothing crashed."""
    r = result
    return (
        r["final"]
        and r["lost"] == r["doubled"] == r["replay_mismatches"] == r["rejected_recounted"] == 0
        and r["acknowledged_missing"] == r["unauthenticated"] == 0
        and r["partial_blobs"] <= r["worker_kills"] + r.get("rank_kills", 0)
        and r["applied"] == r["applied_total_recorded"]
        and not r["crashes"]
        and r["forked_versions"] == 0
    )
