"""``fedjet status``: where a live or recorded job stands, read without disturbing it.

Everything here is a read: stream info, direct gets of the newest global heads, KV gets of the
signed spec and the workers' ``stats.<cloud>`` figures. No durable consumer is created, nothing
is acked, so a running coordinator and its workers never notice. What can be shown depends on
the keys at hand:

* none: stream counts and the workers' own figures (plaintext in the KV bucket);
* the coordinator's public key: also the newest verified head (version, hash, final);
* a member's or the coordinator's secret key: also the version records, hence applied and
  rejected counts and each cloud's last applied update and its staleness.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from fedjet.broker.auth import ClientAuth
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower, LatestHead
from fedjet.channel.island import link_states
from fedjet.channel.kv import read_spec
from fedjet.channel.recorded import only_job, recorded_jetstream
from fedjet.codecs.crypto import COORDINATOR, Boxes, Identity
from fedjet.codecs.frame import Limits
from fedjet.codecs.record import VersionRecord
from fedjet.errors import BrokerError, ConfigError, FedjetError
from fedjet.keystore import load_identity, load_public
from fedjet.observe.status_view import print_status

STATUS_RECONNECTS = 3  # a one-shot read fails fast on a wrong URL or CA
DEFAULT_DEPTH = 16  # versions walked back to find each cloud's last applied update
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError)


@dataclass(frozen=True, kw_only=True)
class StreamStatus:
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True, kw_only=True)
class HeadStatus:
    """The newest global head that carries the coordinator's signature."""

    version: int
    hash: str
    final: bool
    stream_seq: int


@dataclass(frozen=True, kw_only=True)
class RecordStatus:
    """The coordinator's own counters, from the newest version record."""

    strategy: str
    applied_total: int
    rejected_total: int
    rejected: Mapping[str, int]
    published_unix: float
    versions_read: int  # records walked back to place each cloud


@dataclass(frozen=True, kw_only=True)
class CloudStatus:
    cloud: str
    last_version: int | None = None  # newest version (of those walked) that folded its update
    staleness: int | None = None  # that update's staleness when it was applied
    behind: int | None = None  # head version minus last_version
    applied: int = 0  # its updates in the versions walked
    stats: Mapping[str, Any] = field(default_factory=dict)  # the worker's own figures
    link: Mapping[str, Any] | None = None  # island mode: the hub's view of its leaf (link, since_contact_s, lag)


@dataclass(frozen=True, kw_only=True)
class JobStatus:
    job: str
    updates: StreamStatus | None
    globals: StreamStatus | None
    head: HeadStatus | None
    record: RecordStatus | None
    clouds: tuple[CloudStatus, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """One JSON-ready object (``fedjet status --json``)."""
        body = asdict(self)
        body["clouds"] = {c["cloud"]: {k: v for k, v in c.items() if k != "cloud"} for c in body["clouds"]}
        body["notes"] = list(self.notes)
        return body


async def job_status(js: Any, subjects: JobSubjects, boxes: Boxes | None, *, depth: int = DEFAULT_DEPTH) -> JobStatus:
    """Read the job's state; ``boxes`` decides how much (see the module docstring)."""
    notes: list[str] = []
    updates_info = await stream_info(js, subjects.update_stream)  # counts and island links, one read
    updates = _counts(subjects.update_stream, updates_info)
    globals_ = await stream_status(js, subjects.global_stream)
    clouds = await _known_clouds(js, subjects, boxes, notes)
    stats = await read_worker_stats(js, subjects, clouds, notes)
    links = _island_links(updates_info, subjects, tuple(dict.fromkeys([*clouds, *stats])))
    head: HeadStatus | None = None
    records: list[tuple[int, VersionRecord]] = []
    if boxes is None:
        notes.append("no keys: global heads cannot be verified, showing public figures only")
    elif globals_ is not None:
        head, records = await _read_heads(js, subjects, boxes, depth, notes)
    return JobStatus(
        job=subjects.job,
        updates=updates,
        globals=globals_,
        head=head,
        record=_record_status(records),
        clouds=_clouds(tuple(dict.fromkeys([*clouds, *stats])), stats, head, records, links),
        notes=tuple(notes),
    )


async def stream_info(js: Any, name: str) -> Any | None:
    """One stream's info (None when it does not exist yet)."""
    try:
        return await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None
    except NATS_ERRORS as e:
        raise BrokerError(f"stream info of {name}: {type(e).__name__}: {e}") from e


async def stream_status(js: Any, name: str) -> StreamStatus | None:
    """Message and byte counts of one stream (None when it does not exist yet)."""
    return _counts(name, await stream_info(js, name))


def _counts(name: str, info: Any | None) -> StreamStatus | None:
    if info is None:
        return None
    state = info.state
    return StreamStatus(
        name=name, messages=state.messages, bytes=state.bytes, first_seq=state.first_seq, last_seq=state.last_seq
    )


def _island_links(info: Any | None, subjects: JobSubjects, clouds: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Island mode: each sourced cloud's link as the hub's updates stream info reports it: up or
    an island, seconds since the hub last heard from its leaf, messages there not yet sourced."""
    if info is None:
        return {}
    return {state.cloud: state.to_dict() for state in link_states(info, subjects, clouds)}


async def _known_clouds(js: Any, subjects: JobSubjects, boxes: Boxes | None, notes: list[str]) -> list[str]:
    """The spec's clouds when it can be verified, else those that wrote stats."""
    if boxes is not None:
        try:
            spec = await read_spec(js, subjects, boxes.public_of(COORDINATOR))
        except FedjetError as e:
            notes.append(f"job spec not verified ({e.reason}): clouds taken from the workers' stats")
        except NATS_ERRORS as e:
            raise BrokerError(f"reading the job spec: {type(e).__name__}: {e}") from e
        else:
            if spec is not None:
                return list(spec.clouds)
    try:
        kv = await js.key_value(subjects.kv_bucket)
        keys = await kv.keys()
    except (nats.js.errors.NotFoundError, nats.js.errors.NoKeysError):
        return []
    except NATS_ERRORS as e:
        raise BrokerError(f"listing {subjects.kv_bucket}: {type(e).__name__}: {e}") from e
    prefix = subjects.stats_key("x")[: -len("x")]
    return sorted(k[len(prefix) :] for k in keys if k.startswith(prefix))


async def read_worker_stats(
    js: Any, subjects: JobSubjects, clouds: list[str], notes: list[str]
) -> dict[str, dict[str, Any]]:
    """Each cloud's ``stats.<cloud>`` JSON; a missing bucket or key is simply absent."""
    try:
        kv = await js.key_value(subjects.kv_bucket)
    except nats.js.errors.NotFoundError:
        return {}
    except NATS_ERRORS as e:
        raise BrokerError(f"opening {subjects.kv_bucket}: {type(e).__name__}: {e}") from e
    stats: dict[str, dict[str, Any]] = {}
    for cloud in clouds:
        try:
            entry = await kv.get(subjects.stats_key(cloud))
            value = json.loads(entry.value or b"{}")
        except nats.js.errors.NotFoundError:
            continue
        except ValueError:
            notes.append(f"stats.{cloud} is not JSON")
            continue
        except NATS_ERRORS as e:
            raise BrokerError(f"reading stats.{cloud}: {type(e).__name__}: {e}") from e
        if isinstance(value, dict):
            stats[cloud] = value
    return stats


async def _read_heads(
    js: Any, subjects: JobSubjects, boxes: Boxes, depth: int, notes: list[str]
) -> tuple[HeadStatus | None, list[tuple[int, VersionRecord]]]:
    """The newest verified head and, with a member's key, up to ``depth`` records back from it."""
    follower = GlobalFollower(js, subjects, boxes, Limits())
    try:
        latest = await follower.read_latest()
    except NATS_ERRORS as e:
        raise BrokerError(f"reading the newest global head: {type(e).__name__}: {e}") from e
    if latest is None:
        return None, []
    head = HeadStatus(
        version=latest.head.version, hash=latest.head.hash, final=latest.head.final, stream_seq=latest.seq
    )
    return head, await _walk_records(follower, latest, depth, notes)


async def _walk_records(
    follower: GlobalFollower, latest: LatestHead, depth: int, notes: list[str]
) -> list[tuple[int, VersionRecord]]:
    records: list[tuple[int, VersionRecord]] = []
    current = latest.head
    try:
        while len(records) < depth:
            records.append((current.version, follower.record(current)))
            previous = await follower.previous(current)
            if previous is None:
                break
            current = previous
    except FedjetError as e:
        what = "the version records are not sealed to" if not records else "walking back stopped at a record for"
        notes.append(f"{what} {follower.boxes.me.name!r} ({e.reason}): a member's or the coordinator's key opens them")
    except NATS_ERRORS as e:
        notes.append(f"walking back the head chain stopped: {type(e).__name__}")
    return records


def _record_status(records: list[tuple[int, VersionRecord]]) -> RecordStatus | None:
    if not records:
        return None
    newest = records[0][1]
    return RecordStatus(
        strategy=newest.strategy,
        applied_total=newest.progress.applied_total,
        rejected_total=newest.rejected_total,
        rejected=dict(newest.progress.rejected),
        published_unix=newest.published_unix,
        versions_read=len(records),
    )


def _clouds(
    names: tuple[str, ...],
    stats: dict[str, dict[str, Any]],
    head: HeadStatus | None,
    records: list[tuple[int, VersionRecord]],
    links: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[CloudStatus, ...]:
    """Per cloud: its newest applied update among the records walked (newest first)."""
    last: dict[str, tuple[int, int]] = {}  # cloud -> (version, staleness)
    applied: dict[str, int] = {}
    for version, record in records:
        for contribution in reversed(record.contributions):  # folded last = newest
            last.setdefault(contribution.cloud, (version, contribution.staleness))
            applied[contribution.cloud] = applied.get(contribution.cloud, 0) + 1
    names = tuple(dict.fromkeys([*names, *last]))
    out = []
    for cloud in names:
        seen = last.get(cloud)
        behind = head.version - seen[0] if head is not None and seen is not None else None
        out.append(
            CloudStatus(
                cloud=cloud,
                last_version=None if seen is None else seen[0],
                staleness=None if seen is None else seen[1],
                behind=behind,
                applied=applied.get(cloud, 0),
                stats=stats.get(cloud, {}),
                link=(links or {}).get(cloud),
            )
        )
    return tuple(out)


def status_boxes(keys_dir: str | Path | None, identity: str | None = None) -> Boxes | None:
    """The keys status reads with: ``identity``'s, else the coordinator's, else any member's,
    else only ``coordinator.pub`` (heads verified, records closed), else none."""
    if keys_dir is None:
        return None
    directory = Path(keys_dir)
    if not directory.is_dir():
        raise ConfigError(f"--keys {directory}: no such directory")
    if identity is None:
        secrets = sorted(p.stem for p in directory.glob("*.key"))
        identity = COORDINATOR if COORDINATOR in secrets else (secrets[0] if secrets else None)
    if identity is None:
        if not (directory / f"{COORDINATOR}.pub").is_file():
            raise ConfigError(f"--keys {directory} holds neither a secret key nor coordinator.pub")
        reader = Identity.generate("status")  # throwaway: verifies heads, opens nothing
        return Boxes(reader, {COORDINATOR: load_public(directory, COORDINATOR)})
    me = load_identity(directory, identity)
    peers = {} if identity == COORDINATOR else {COORDINATOR: load_public(directory, COORDINATOR)}
    return Boxes(me, peers)


async def status_command(
    url: str | list[str] | None,
    job: str | None,
    keys_dir: str | None,
    store_dir: str | None,
    json: bool,
    *,
    auth: ClientAuth | None = None,
    domain: str | None = None,
    identity: str | None = None,
) -> int:
    """``fedjet status (--nats URL | --store DIR) [--job J] [--keys DIR] [--json]``.

    ``--store`` starts the embedded server over a store that ``fedjet up --store`` kept (never
    over the store of a server still running) and reads keys from ``DIR/keys`` by default.
    """
    if store_dir is not None and keys_dir is None and (Path(store_dir) / "keys").is_dir():
        keys_dir = str(Path(store_dir) / "keys")
    boxes = status_boxes(keys_dir, identity)
    nats_url = ",".join(url) if isinstance(url, list) else url
    async with recorded_jetstream(
        store_dir, nats_url, "fedjet-status", auth=auth, domain=domain, timeout=5.0, reconnects=STATUS_RECONNECTS
    ) as js:
        status = await job_status(js, JobSubjects(job or await only_job(js)), boxes)
    print_status(status, json=json)
    return 0
