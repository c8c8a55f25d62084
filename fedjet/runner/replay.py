"""``fedjet replay``: read a recorded job out of JetStream and verify or re-aggregate it.

Reading uses throwaway consumers without acks, so live durable consumers are never disturbed.
The aggregation runs in a worker thread through the pure :mod:`fedjet.coordinator.replay`
functions; fetching recorded updates and weights is bridged back to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats.js.errors
from tqdm import tqdm

from fedjet.broker.blobs import Blob, BlobAssembler
from fedjet.broker.jetstream import close_quietly, connect, read_range
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.crypto import COORDINATOR, Boxes
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHead, open_sealed_update
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.replay import RecordedVersion, VerifyResult, counterfactual, verify
from fedjet.coordinator.strategies import StrategyConfig
from fedjet.coordinator.validate import to_contribution
from fedjet.errors import BlobError, ConfigError, ValidationError
from fedjet.follow import GlobalFollower
from fedjet.keystore import load_identity, load_public
from fedjet.report import Report, RoundRecord, round_line, summarize
from fedjet.spec import JobSpec, verify_spec

T = TypeVar("T")
COUNTERFACTUAL_NOTE = (
    "counterfactual: the recorded updates were trained from the recorded global versions, "
    "not from the counterfactual globals"
)


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    store: str | None = None
    nats_url: str | None = None
    job: str | None = None
    keys: str | None = None
    verify: bool = False
    strategy: StrategyConfig | None = None  # a counterfactual rule; None = the recorded one
    from_version: int = 0
    until_version: int | None = None
    report: str | None = None
    data: str | None = None
    eval_tokens: int = 16384
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.store is None) == (self.nats_url is None):
            raise ConfigError("give exactly one of --store DIR or --nats URL")
        if self.verify and self.strategy is not None:
            raise ConfigError("--verify re-applies the recorded strategy; drop --strategy")
        if not self.verify and self.strategy is None:
            raise ConfigError("say what to do: --verify, or --strategy NAME for a counterfactual")
        if self.from_version < 0:
            raise ConfigError("--from-version must be >= 0")

    @property
    def keys_dir(self) -> str:
        if self.keys:
            return self.keys
        if self.store and (Path(self.store) / "keys").is_dir():
            return str(Path(self.store) / "keys")
        raise ConfigError("replay needs the coordinator's keys: --keys DIR (coordinator.key and members' .pub)")


@dataclass
class Recording:
    """What was read back: the spec, the heads (one per version) and their records."""

    spec: JobSpec
    strategy: StrategyConfig
    heads: dict[int, GlobalHead]
    versions: list[RecordedVersion]


def run_replay(config: ReplayConfig) -> dict[str, Any] | Report:
    return asyncio.run(_run(config))


async def _run(config: ReplayConfig) -> dict[str, Any] | Report:
    server = None
    url = config.nats_url
    if config.store is not None:
        if not (Path(config.store) / "jetstream").is_dir():
            raise ConfigError(f"{config.store} holds no JetStream store (fedjet up --store DIR writes one)")
        server = EmbeddedNatsServer(config.store)
        url = server.start()
    assert url is not None
    nc = await connect(url, "fedjet-replay")
    try:
        js = nc.jetstream()
        job = config.job or await _only_job(js)
        session = _Session(js, JobSubjects(job), config)
        return await session.run()
    finally:
        await close_quietly(nc)
        if server is not None:
            server.stop()


async def _only_job(js: Any) -> str:
    names = [info.config.name for info in await js.streams_info()]
    prefix, suffix = "FEDJET_", "_GLOBALS"
    jobs = sorted(n[len(prefix) : -len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix))
    if len(jobs) != 1:
        raise ConfigError(f"say which --job to replay; this JetStream holds {jobs or 'none'}")
    return jobs[0]


class _Session:
    def __init__(self, js: Any, subjects: JobSubjects, config: ReplayConfig) -> None:
        self.js = js
        self.subjects = subjects
        self.config = config
        self.limits = Limits()
        self.loop = asyncio.get_running_loop()
        self._updates: _UpdateReader | None = None
        self._weights_cache: dict[int, Weights] = {}

    async def run(self) -> dict[str, Any] | Report:
        self.recording = recording = await self._read_recording()
        first = self.config.from_version
        last = self.config.until_version if self.config.until_version is not None else max(recording.heads)
        if first not in recording.heads or last not in recording.heads or last < first:
            raise ConfigError(f"versions {first}..{last} are not all recorded (have 0..{max(recording.heads)})")
        versions = [v for v in recording.versions if first < v.version <= last]
        start = await self._weights(first)
        self._updates = _UpdateReader(self.js, self.subjects, self.limits)
        try:
            if self.config.verify:
                return (await self._verify(start, first, versions)).to_dict()
            return await self._counterfactual(start, first, versions)
        finally:
            await self._updates.close()

    async def _read_recording(self) -> Recording:
        me = load_identity(self.config.keys_dir, COORDINATOR)
        try:
            kv = await self.js.key_value(self.subjects.kv_bucket)
            spec = verify_spec((await kv.get("spec")).value, me.public)
        except nats.js.errors.NotFoundError as e:
            raise ConfigError(f"job {self.subjects.job!r} has no recorded spec in this JetStream") from e
        peers = {m: load_public(self.config.keys_dir, m) for m in (*spec.clouds, *spec.observers)}
        self.boxes = Boxes(me, peers)
        self.follower = GlobalFollower(self.js, self.subjects, self.boxes, self.limits)
        heads: dict[int, GlobalHead] = {}
        async for msg in read_range(self.js, self.subjects.global_stream, self.subjects.global_head):
            head = self.follower.parse_head(msg.data)
            heads.setdefault(head.version, head)  # a final marker repeats the last version
        if not heads:
            raise ConfigError(f"job {self.subjects.job!r} has no recorded global versions")
        versions = []
        for version in sorted(heads):
            meta = self.follower.meta(heads[version])
            versions.append(RecordedVersion(version, heads[version].hash, list(meta.get("contributions", []))))
        strategy = StrategyConfig.from_dict(spec.strategy_config) if spec.strategy_config else StrategyConfig()
        return Recording(spec, strategy, heads, versions)

    async def _weights(self, version: int) -> Weights:
        if version not in self._weights_cache:
            if len(self._weights_cache) > 16:
                self._weights_cache.pop(next(iter(self._weights_cache)))
            fetched = await self.follower.fetch(self.recording.heads[version])
            self._weights_cache[version] = fetched.tensors
        return self._weights_cache[version]

    def _bridge(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine on the event loop from the replay thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(_awaited(make), self.loop).result()

    def _contribution_of(self, template: Weights) -> Callable[[dict[str, Any]], Contribution]:
        spec, strategy = self.recording.spec, self.recording.strategy

        def contribution_of(recorded: dict[str, Any]) -> Contribution:
            assert self._updates is not None
            seq, cloud = int(recorded["stream_seq"]), str(recorded["cloud"])
            blob = self._bridge(lambda: self._updates.take(seq))
            update = open_sealed_update(blob.data, self.boxes, JobSubjects.cloud_of(blob.subject), self.limits)
            if update.header.seq != recorded["seq"] or update.header.cloud != cloud:
                raise ValidationError(
                    f"stream seq {seq} holds {update.header.cloud}/{update.header.seq}, not the recorded one"
                )
            return to_contribution(update, cloud, spec, strategy, template)

        return contribution_of

    async def _verify(self, start: Weights, first: int, versions: list[RecordedVersion]) -> VerifyResult:
        bar = tqdm(
            total=len(versions), desc="verify", unit="version", disable=not self.config.progress, file=sys.stderr
        )
        try:
            return await asyncio.to_thread(
                verify,
                start,
                first,
                versions,
                self.recording.strategy,
                self._contribution_of(start),
                lambda v: self._bridge(lambda: self._weights(v)),
                lambda _: bar.update(1),
            )
        finally:
            bar.close()

    async def _counterfactual(self, start: Weights, first: int, versions: list[RecordedVersion]) -> Report:
        from fedjet.runner.evaluate import Evaluator

        strategy = self.config.strategy
        assert strategy is not None
        evaluator = await asyncio.to_thread(
            Evaluator.build, self.recording.spec, self.config.data, self.config.eval_tokens, self.config.device
        )
        print(f"note: {COUNTERFACTUAL_NOTE}", flush=True)
        steps = counterfactual(
            start,
            first,
            versions,
            strategy,
            self.recording.strategy,
            len(self.recording.spec.clouds),
            self._contribution_of(start),
            lambda v: self._bridge(lambda: self._weights(v)),
        )
        rounds = [await asyncio.to_thread(_record, 0, first, start, evaluator, [], 0)]
        while (step := await asyncio.to_thread(next, steps, None)) is not None:
            version, weights, hash_, batch = step
            applied = rounds[-1].applied_total + len(batch)
            record = await asyncio.to_thread(_record, len(rounds), version, weights, evaluator, batch, applied, hash_)
            rounds.append(record)
            print(round_line(record), flush=True)
        report = Report(
            config={
                "replay_of": self.subjects.job,
                "strategy": strategy.name,
                "strategy_config": strategy.to_dict(),
                "recorded_strategy": self.recording.strategy.to_dict(),
                "from_version": first,
                "until_version": versions[-1].version if versions else first,
                "data": evaluator.source,
                "eval_tokens": self.config.eval_tokens,
            },
            rounds=rounds,
            notes=[COUNTERFACTUAL_NOTE, *evaluator.notes],
        )
        report.summary = summarize(rounds, {}, rejected=0)
        if self.config.report:
            report.write(self.config.report)
        return report


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def _record(
    index: int,
    version: int,
    weights: Weights,
    evaluator: Any,
    batch: list[dict[str, Any]],
    applied_total: int,
    hash_: str | None = None,
) -> RoundRecord:
    from fedjet.codecs.tensors import weights_hash

    result = evaluator.evaluate(weights)
    samples = sum(int(c["samples"]) for c in batch) or 1
    return RoundRecord(
        round=index,
        version=version,
        train_loss=sum(float(c["loss"]) * int(c["samples"]) for c in batch) / samples if batch else None,
        eval_loss=result.loss,
        eval_ppl=result.ppl,
        eval_acc=result.acc,
        bytes_up=sum(int(c.get("wire_bytes", 0)) for c in batch),
        bytes_down=0,
        wall_s=0.0,
        round_s=0.0,
        hash=hash_ or weights_hash(weights),
        contributors=[str(c["cloud"]) for c in batch],
        staleness=[int(c["staleness"]) for c in batch],
        applied_total=applied_total,
    )


class _UpdateReader:
    """The update stream in order, reassembled; ``take(seq)`` returns the blob ending at ``seq``.

    Recorded batches reference ever larger sequences, so one forward pass suffices and only
    the blobs in between are held (and dropped) on the way.
    """

    def __init__(self, js: Any, subjects: JobSubjects, limits: Limits) -> None:
        self._messages = read_range(js, subjects.update_stream, subjects.updates, 1)
        self._assembler = BlobAssembler(
            max_blob_bytes=limits.max_frame_bytes, max_pending_bytes=2 * limits.max_frame_bytes
        )
        self._done = False
        self._ahead: Blob | None = None  # read past a missing update; still wanted later

    async def close(self) -> None:
        await self._messages.aclose()

    async def take(self, seq: int) -> Blob:
        if self._ahead is not None:
            blob, self._ahead = self._ahead, None
            if blob.last_seq == seq:
                return blob
            if blob.last_seq > seq:
                self._ahead = blob
                raise BlobError(f"the update recorded at stream seq {seq} is missing from the stream")
        while not self._done:
            try:
                msg = await self._messages.__anext__()
            except StopAsyncIteration:
                self._done = True
                break
            try:
                blob = self._assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream)
            except BlobError:
                continue  # rejected live too; not part of any recorded batch
            if blob is None:
                continue
            if blob.last_seq == seq:
                return blob
            if blob.last_seq > seq:
                self._ahead = blob
                raise BlobError(f"the update recorded at stream seq {seq} is missing from the stream")
        raise BlobError(f"the update recorded at stream seq {seq} is missing from the stream")


def print_summary(summary: dict[str, Any]) -> None:
    print(json.dumps(summary), flush=True)
