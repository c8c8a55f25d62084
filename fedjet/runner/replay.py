"""``fedjet replay``: read a recorded job out of JetStream and verify or re-aggregate it.

Reading uses throwaway consumers without acks, so live durable consumers are never disturbed.
The aggregation runs in a worker thread through the pure :mod:`fedjet.coordinator.replay`
functions; fetching recorded updates and weights is bridged back to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, replace
from typing import Any

import msgpack  # type: ignore[import-untyped]
from tqdm import tqdm

from fedjet.broker.auth import ClientAuth
from fedjet.broker.blobs import Blob, BlobAssembler
from fedjet.broker.jetstream import read_range
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.recorded import coordinator_view, keys_dir_for, only_job, recorded_jetstream
from fedjet.channel.secagg import secagg_max_bytes
from fedjet.codecs.crypto import COORDINATOR, open_secagg
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import GlobalHead
from fedjet.codecs.record import ContributionRecord
from fedjet.codecs.tensors import weights_hash
from fedjet.codecs.withheld import coordinator_only
from fedjet.config.job import StrategyConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.privacy_check import PrivacyBudget
from fedjet.coordinator.replay import Counterfactual, RecordedVersion, Verifier, VerifyResult, counterfactual_batches
from fedjet.coordinator.secure_sum import members_of, read_transcript_blob, recorded_average, secure_contribution
from fedjet.errors import BlobError, ConfigError, FedjetError, ValidationError
from fedjet.report import Report, RoundRecord, round_line, summarize
from fedjet.secagg import Transcript
from fedjet.spec import JobSpec

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
    eval_data: str | None = None
    model: str | None = None  # a local copy of the checkpoint (tokenizer, LoRA base)
    eval_tokens: int = 16384
    device: str | None = None
    progress: bool = True
    auth: ClientAuth | None = None
    js_domain: str | None = None
    without: tuple[str, ...] = ()  # counterfactual: these clouds' updates left out (what an island added)

    def __post_init__(self) -> None:
        if (self.store is None) == (self.nats_url is None):
            raise ConfigError("give exactly one of --store DIR or --nats URL")
        if self.verify and self.strategy is not None:
            raise ConfigError("--verify re-applies the recorded strategy; drop --strategy")
        if not self.verify and self.strategy is None:
            raise ConfigError("say what to do: --verify, or --strategy NAME for a counterfactual")
        if self.from_version < 0:
            raise ConfigError("--from-version must be >= 0")
        if self.without and self.verify:
            raise ConfigError("--without is a counterfactual: drop --verify and name the --strategy")

    @property
    def keys_dir(self) -> str:
        return keys_dir_for(self.keys, self.store)


@dataclass
class Recording:
    """What was read back: the spec, the heads (one per version) and their records."""

    spec: JobSpec
    heads: dict[int, GlobalHead]
    versions: list[RecordedVersion]


def verify_recording(config: ReplayConfig) -> VerifyResult:
    """``fedjet replay --verify``: re-apply every recorded version and compare hashes."""
    return asyncio.run(_with_session(config, lambda s: s.verify()))


def replay_counterfactual(config: ReplayConfig) -> Report:
    """``fedjet replay --strategy S``: the recorded updates re-aggregated under another rule."""
    return asyncio.run(_with_session(config, lambda s: s.counterfactual()))


async def _with_session(config: ReplayConfig, work: Any) -> Any:
    async with recorded_jetstream(
        config.store, config.nats_url, "fedjet-replay", auth=config.auth, domain=config.js_domain
    ) as js:
        job = config.job or await only_job(js)
        session = _Session(js, JobSubjects(job), config)
        await session.open()
        try:
            return await work(session)
        finally:
            await session.close()


class _Session:
    """Reads the record and the updates; the pure :mod:`fedjet.coordinator.replay` re-aggregates."""

    def __init__(self, js: Any, subjects: JobSubjects, config: ReplayConfig) -> None:
        self.js = js
        self.subjects = subjects
        self.config = config
        self.limits = Limits()
        self._weights_cache: dict[int, Weights] = {}

    async def open(self) -> None:
        self.recording = recording = await self._read_recording()
        self.first = self.config.from_version
        last = self.config.until_version if self.config.until_version is not None else max(recording.heads)
        if self.first not in recording.heads or last not in recording.heads or last < self.first:
            raise ConfigError(f"versions {self.first}..{last} are not all recorded (have 0..{max(recording.heads)})")
        self.versions = [v for v in recording.versions if self.first < v.version <= last]
        self.start = await self._weights(self.first)
        self.updates = _UpdateReader(self.js, self.subjects, self.limits)
        self.admission = Admission(recording.spec, self.boxes, self.limits, legacy_envelopes=True)
        # the DP steps claimed by the updates applied up to the first version; each one re-admitted adds its own
        before = [c for v in recording.versions if v.version <= self.first for c in v.contributions]
        self.budget = PrivacyBudget.claimed_in(before)

    async def close(self) -> None:
        await self.updates.close()

    async def _read_recording(self) -> Recording:
        spec, self.boxes = await coordinator_view(self.js, self.subjects, self.config.keys_dir)
        self.follower = GlobalFollower(self.js, self.subjects, self.boxes, self.limits)
        heads: dict[int, GlobalHead] = {}
        async for signed in self.follower.recorded_heads():
            heads.setdefault(signed.head.version, signed.head)  # a final marker repeats the last version
        if not heads:
            raise ConfigError(f"job {self.subjects.job!r} has no recorded global versions")
        records = {v: self.follower.record(heads[v]) for v in sorted(heads)}
        me = self.boxes.me.box
        versions = [
            RecordedVersion(
                v, heads[v].hash, r.contributions, r.secure, coordinator_only(r, me).noise_key, r.running_sum
            )
            for v, r in records.items()
        ]
        return Recording(spec, heads, versions)

    async def _weights(self, version: int) -> Weights:
        if version not in self._weights_cache:
            if len(self._weights_cache) > 16:
                self._weights_cache.pop(next(iter(self._weights_cache)))
            fetched = await self.follower.fetch(self.recording.heads[version])
            self._weights_cache[version] = fetched.tensors
        return self._weights_cache[version]

    async def _contributions(
        self, recorded: tuple[ContributionRecord, ...] | list[ContributionRecord], template: Weights
    ) -> list[Contribution]:
        """Each recorded update, authenticated and admitted again through the live coordinator's
        own call (its privacy claim against the clouds' budgets included)."""
        out = []
        for c in recorded:
            blob = await self.updates.take(c.stream_seq)
            cloud = JobSubjects.cloud_of(blob.subject)
            update = await asyncio.to_thread(self.admission.open, blob.data, cloud)
            h = update.header
            if h.seq != c.seq or h.cloud != c.cloud:
                raise ValidationError(f"stream seq {c.stream_seq} holds {h.cloud}/{h.seq}, not the recorded one")
            check = self.admission.check
            admitted = await asyncio.to_thread(check, update, cloud, template, lambda _base: 0, self.budget)
            out.append(admitted.contribution)
        return out

    async def _secure_contribution(self, record: RecordedVersion) -> Contribution:
        """A secure version: the sum recomputed from the transcript the coordinator recorded."""
        secure, spec = record.secure, self.recording.spec
        config = spec.config.secure_agg_config
        assert secure is not None
        if config is None:
            raise ValidationError(f"version {record.version} records a secure round, but the job has no --secure-agg")
        base = self.recording.heads.get(record.version - 1)
        if base is None:
            raise ValidationError(f"the base of version {record.version} is not recorded")
        limit = (len(spec.clouds) + 1) * secagg_max_bytes(len(spec.clouds), secure.numel)
        envelope = await read_transcript_blob(self.js, self.subjects, secure, limit)
        _, packed = open_secagg(envelope, self.boxes, limit, senders={COORDINATOR})
        try:
            transcript = Transcript.from_wire(msgpack.unpackb(packed, raw=False))
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise ValidationError(f"transcript of version {record.version}: {type(e).__name__}") from e
        verify_keys = {c: self.boxes.public_of(c).verify for c in spec.clouds}  # members' signatures, weights too
        average = await asyncio.to_thread(recorded_average, transcript, secure, config, verify_keys)
        return secure_contribution(
            average, job=spec.job, base_version=base.version, base_hash=base.hash, numel_masked=secure.numel,
            template=self.start, members=members_of(record.contributions),
        )  # fmt: skip

    async def _provide_bases(self, aggregator: Any, recorded: Any) -> None:
        for base in {c.base for c in recorded}:
            if aggregator.strategy.needs_stale_bases and not aggregator.holds(base):
                aggregator.provide_base(base, await self._weights(base))

    async def verify(self) -> VerifyResult:
        verifier = Verifier(self.recording.spec.strategy, self.start, self.first, len(self.recording.spec.clouds))
        bar = tqdm(
            total=len(self.versions), desc="verify", unit="version", disable=not self.config.progress, file=sys.stderr
        )
        try:
            for record in self.versions:
                try:
                    if record.secure is not None:
                        contributions = [await self._secure_contribution(record)]
                    else:
                        contributions = await self._contributions(record.contributions, self.start)
                    await self._provide_bases(verifier.aggregator, record.contributions)
                    mismatch = await asyncio.to_thread(verifier.check, record, contributions)
                except FedjetError as e:
                    mismatch = verifier.fail(record, f"{e.reason}: {e}")
                if mismatch is not None:
                    verifier.aggregator.resync(await self._weights(record.version), record.version)
                bar.update(1)
        finally:
            bar.close()
        return verifier.result

    async def counterfactual(self) -> Report:
        from fedjet.runner.evaluate import Evaluator

        strategy = self.config.strategy
        assert strategy is not None
        spec = self.recording.spec
        if spec.config.secure_agg is not None:
            raise ConfigError(
                "a --secure-agg run cannot be re-aggregated under another strategy: the coordinator only ever held "
                "each round's sum (fedjet replay --verify still recomputes every sum from its transcript)"
            )
        evaluator = await asyncio.to_thread(
            lambda: Evaluator.build(
                spec,
                eval_tokens=self.config.eval_tokens,
                eval_data=self.config.eval_data,
                data=self.config.data,
                model_path=self.config.model,
                device=self.config.device,
            )
        )
        print(f"note: {COUNTERFACTUAL_NOTE}", flush=True)
        unknown = sorted(set(self.config.without) - set(spec.clouds))
        if unknown:
            raise ConfigError(f"--without {','.join(unknown)}: not a cloud of job {spec.job} {spec.clouds}")
        versions = [
            replace(v, contributions=tuple(c for c in v.contributions if c.cloud not in self.config.without))
            for v in self.versions
        ]
        folding = Counterfactual(strategy, self.start, self.first, len(spec.clouds))
        rounds = [await asyncio.to_thread(_record, 0, self.first, self.start, evaluator, [], 0)]
        for batch in counterfactual_batches(versions, strategy, spec.strategy, spec.clouds):
            contributions = await self._contributions(batch, self.start)
            await self._provide_bases(folding.aggregator, batch)
            weights = await asyncio.to_thread(folding.apply, batch, contributions)
            version, applied = folding.aggregator.version, rounds[-1].applied_total + len(batch)
            record = await asyncio.to_thread(_record, len(rounds), version, weights, evaluator, batch, applied)
            rounds.append(record)
            print(round_line(record), flush=True)
        return self._counterfactual_report(strategy, evaluator, rounds)

    def _counterfactual_report(self, strategy: StrategyConfig, evaluator: Any, rounds: list[RoundRecord]) -> Report:
        from fedjet.config.wire import to_wire

        report = Report(
            config={
                "replay_of": self.subjects.job,
                "strategy": strategy.name,
                "strategy_config": to_wire(strategy),
                "recorded_strategy": to_wire(self.recording.spec.strategy),
                "from_version": self.first,
                "until_version": self.versions[-1].version if self.versions else self.first,
                "data": evaluator.source,
                "eval_tokens": self.config.eval_tokens,
                "without": list(self.config.without),
            },
            rounds=rounds,
            notes=[COUNTERFACTUAL_NOTE, *evaluator.notes],
        )
        recorded = {"bytes_up": sum(r.bytes_up for r in rounds), "bytes_down": sum(r.bytes_down for r in rounds)}
        report.summary = {**summarize(rounds, rejected=0), **recorded}  # payloads as recorded: no socket here
        if self.config.report:
            report.write(self.config.report)
        return report


def _record(
    index: int,
    version: int,
    weights: Weights,
    evaluator: Any,
    batch: list[ContributionRecord],
    applied_total: int,
) -> RoundRecord:
    result = evaluator.evaluate(weights)
    samples = sum(c.samples for c in batch) or 1
    return RoundRecord(
        round=index,
        version=version,
        train_loss=sum(c.loss * c.samples for c in batch) / samples if batch else None,
        eval_loss=result.loss,
        eval_ppl=result.ppl,
        eval_acc=result.acc,
        bytes_up=sum(c.wire_bytes for c in batch),
        bytes_down=0,
        wall_s=0.0,
        round_s=0.0,
        hash=weights_hash(weights),
        contributors=[c.cloud for c in batch],
        staleness=[c.staleness for c in batch],
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
