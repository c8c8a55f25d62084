"""The worker daemon: one per cloud. Follows globals, trains locally, publishes updates.

Raw text never leaves this process: only encoded (and, with keys, encrypted) weight deltas or
gradients are published, to this cloud's own update subject.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from fedjet.broker.auth import ClientAuth
from fedjet.broker.connect import RECONNECT_WINDOW_S, NatsTarget, check_reconnect_window, open_target
from fedjet.broker.jetstream import close_quietly
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.kv import await_spec, put_stats
from fedjet.channel.secagg import SecAggLink, secagg_max_bytes
from fedjet.channel.updates import UpdateSender
from fedjet.codecs.crypto import COORDINATOR
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import RETIRE, GlobalHead, GlobalVersion, UpdateHeader, frame_update
from fedjet.codecs.pipeline import Compressed
from fedjet.config.codec import CodecSpec
from fedjet.config.names import check_token
from fedjet.data.batches import BatchSampler
from fedjet.errors import ConfigError
from fedjet.keystore import load_public, member_boxes
from fedjet.log import get_logger
from fedjet.models.job_model import job_model_for
from fedjet.observe.metrics import WorkerMetrics
from fedjet.spec import JobSpec
from fedjet.worker.delta import DeltaTracker
from fedjet.worker.local_data import dealt_share, own_data
from fedjet.worker.model import pick_device
from fedjet.worker.private import PrivateTraining
from fedjet.worker.secure import SecureMember
from fedjet.worker.train import LocalTrainer, StepsResult, evaluate

log = get_logger("fedjet.worker")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    nats_url: str
    auth: ClientAuth | None = None  # this cloud's NKEY/creds and TLS
    js_domain: str | None = None  # the hub's JetStream domain, behind a leaf node
    reconnect_window_s: float = RECONNECT_WINDOW_S  # how long a broker outage is ridden out
    metrics: WorkerMetrics | None = None
    job: str
    cloud: str
    keys: str
    worker_id: str = "0"
    data: str | None = None  # this cloud's own data (the production shape)
    deal: bool = False  # take this cloud's share of one corpus at ``data`` instead (the demo)
    model: str | None = None  # this cloud's copy of the checkpoint (and tokenizer)
    slowdown: float = 1.0
    device: str | None = None
    precision: str | None = None  # bf16 | fp32; default bf16 on CUDA, fp32 on CPU
    spec_timeout_s: float = 120.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_token("job", self.job)
        check_token("cloud", self.cloud)
        check_token("worker", self.worker_id)
        if self.slowdown < 1.0:
            raise ConfigError(f"slowdown must be >= 1, got {self.slowdown}")
        check_reconnect_window(self.reconnect_window_s)


@dataclass
class WorkerStats:
    cloud: str
    updates_sent: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    idle_s: float = 0.0
    wall_s: float = 0.0
    data_documents: int = 0
    data_tokens: int = 0
    heldout_loss: float | None = None
    initial_weights: str = ""  # "local" when version 0 came from this cloud's own copy
    retired: bool = False  # out of privacy budget
    dp_epsilon: float | None = None  # a DP job's ε spent so far

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        out["idle_frac"] = self.idle_s / self.wall_s if self.wall_s else 0.0
        return out


# Phases that would start before this version wait for it: the first updates are the largest
# and most diverse, and a phase trained from a cloud's own estimate of the global costs most there.
OVERLAP_FROM_VERSION = 1


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.subjects = JobSubjects(config.job)
        self.boxes = member_boxes(config.keys, config.cloud)
        self.stats = WorkerStats(config.cloud)
        self.metrics = config.metrics or WorkerMetrics(config.cloud)  # a private registry unless served
        self._seq = time.time_ns() // 1000  # increases across restarts: the anti-replay counter
        self._stop = asyncio.Event()
        self._nc: Any = None
        self._js: Any = None
        self.follower: GlobalFollower | None = None
        self.trainer: LocalTrainer | None = None
        self.secure: SecureMember | None = None
        self._base: tuple[GlobalHead, dict[str, Any]] | None = None
        self._joined = False  # the job's spec was read: its bucket exists to report stats to

    def stop(self) -> None:
        self._stop.set()
        if self.trainer is not None:
            self.trainer.stopping.set()

    async def run(self) -> WorkerStats:
        started = time.perf_counter()
        cfg = self.config
        target = NatsTarget(
            url=cfg.nats_url, auth=cfg.auth, domain=cfg.js_domain, reconnect_window_s=cfg.reconnect_window_s
        )
        self._nc, self._js = await open_target(target, f"fedjet-worker-{cfg.job}-{cfg.cloud}")
        try:
            with structlog.contextvars.bound_contextvars(job=cfg.job, cloud=cfg.cloud):
                self.spec = await await_spec(
                    self._js, self.subjects, self.boxes.public_of(COORDINATOR), cfg.spec_timeout_s
                )
                self.spec.cloud_index(cfg.cloud)
                self._joined = True
                self.trainer, self.tracker, self.codec = await asyncio.to_thread(self._prepare, self.spec)
                self.sender = UpdateSender(
                    self._js, self.subjects, self.boxes, cfg.cloud, cfg.worker_id, max_payload=self._nc.max_payload
                )
                own = self.trainer.weights()  # frame limits sized from the model, not 1 GiB
                limits = Limits.for_model(sum(t.numel() for t in own.values()), len(own))
                self.follower = GlobalFollower(self._js, self.subjects, self.boxes, limits, views=True)
                await self.follower.start()
                await self._start_secure(own)
                await self._loop()
        finally:
            self.stats.wall_s = time.perf_counter() - started
            if self.follower is not None:
                await self.follower.stop()
            if self.secure is not None:
                await self.secure.link.stop()
            await self._report_stats()
            await close_quietly(self._nc)
        return self.stats

    async def _start_secure(self, own: dict[str, Any]) -> None:
        """A secure-aggregation job: listen for the coordinator's rounds from now on."""
        config = self.spec.config.secure_agg_config
        if config is None:
            return
        numel = sum(t.numel() for t in own.values())
        link = SecAggLink(
            self._js, self.subjects, self.boxes, peers=(COORDINATOR,),
            max_bytes=secagg_max_bytes(len(self.spec.clouds), config.numel_masked(numel)),
            max_payload=self._nc.max_payload,
        )  # fmt: skip
        verify_keys = {c: load_public(self.config.keys, c).verify for c in self.spec.clouds}
        await link.start()
        self.secure = SecureMember(
            link, job=self.spec.job, cloud=self.config.cloud, clouds=self.spec.clouds, config=config,
            signing_key=self.boxes.me.sign, verify_keys=verify_keys,
            staleness=self.spec.strategy.staleness, max_staleness=self.spec.strategy.max_staleness,
        )  # fmt: skip

    def _prepare(self, spec: JobSpec) -> tuple[LocalTrainer, DeltaTracker, CodecSpec]:
        cfg, job = self.config, spec.config
        self.job_model = job_model_for(spec, cfg.model)
        tokenizer = self.job_model.tokenizer
        if cfg.deal:
            self.data = dealt_share(cfg.data, tokenizer, spec, cfg.cloud)
        else:
            self.data = own_data(cfg.data, tokenizer, spec)
        index = spec.cloud_index(cfg.cloud)
        sampler = BatchSampler(self.data.train, job.train.seq_len, job.train.batch_size, seed=job.seed * 1000 + index)
        device = pick_device(cfg.device)
        trainer = LocalTrainer(
            self.job_model, sampler, job.train, device, slowdown=cfg.slowdown, precision=cfg.precision
        )
        codec = CodecSpec.parse(job.codec)
        dp = job.dp_config
        self.private = None if dp is None else PrivateTraining(dp, spec, self.data, trainer)
        self.stats.data_documents, self.stats.data_tokens = self.data.documents, self.data.tokens
        log.info(
            "worker_ready",
            documents=self.data.documents,
            tokens=self.data.tokens,
            skipped=self.data.skipped,
            source=self.data.source,
            note=self.data.note,
            device=str(device),
            precision=trainer.precision,
        )
        return trainer, DeltaTracker(codec, reference=spec.delta_reference), codec

    async def _loop(self) -> None:
        """Sync: wait for each new global. Async: take the newest between local rounds, if any."""
        if self.spec.config.train.schedule == "overlap":
            await self._overlapped_loop()
            return
        base: GlobalHead | None = None
        steps = self.spec.config.train.local_steps
        local_v0 = self._hold_version_zero()
        sends_on_base = 0
        while not self._stop.is_set():
            wait_from = time.perf_counter()
            if base is None or self.spec.synchronous or sends_on_base >= self.spec.strategy.max_staleness:
                # sync rounds wait for each version; an async worker that sent max_staleness
                # updates on one base pauses, since more would arrive too stale to be applied
                head = await self.follower.newer_than(-1 if base is None else base.version)
            else:
                latest = self.follower.latest
                head = latest if latest is not None and latest.version > base.version else None
            if self.follower.final is not None:
                break
            if head is not None:
                version = await self.follower.fetch(head)
                if head.version == 0:
                    self._note_initial_weights(version, local_v0)
                self.trainer.load(version.tensors)
                if self.secure is not None:  # masked updates are measured from the base, dense
                    self._base = (head, {n: t.detach().clone() for n, t in version.tensors.items()})
                self.metrics.version(head.version)
                self.tracker.rebase(version.tensors, head.version)
                base, sends_on_base = head, 0
                steps = self._assigned_steps(head, steps)
            self.stats.idle_s += time.perf_counter() - wait_from
            assert base is not None
            if self.private is not None and not self.private.affordable(steps):
                await self._retire(base.version)
                break
            await self._train_and_send(base.version, steps)
            sends_on_base += 1

    async def _overlapped_loop(self) -> None:
        """``--schedule overlap`` (synchronous delta rules): the next local phase trains while the
        last update uploads and the version it goes into is made and downloaded, as
        one-step-delayed and streaming DiLoCo do.

        A phase starts where the last one ended, W_k = G_k-1 + (this cloud's own progress). When
        G_k (the version its last update went into) arrives mid-phase, the difference G_k - W_k
        is added to the model between two steps, so the rest of the phase trains on the global;
        the update is measured from G_k and claims it as its base. Only the steps before that
        version arrived were taken from the cloud's own estimate of it. The worker waits only
        when that version has not arrived by the end of a phase, or when the previous upload
        is still going.
        """
        assert self.follower is not None and self.trainer is not None
        local_v0 = self._hold_version_zero()
        wait_from = time.perf_counter()
        head = await self.follower.newer_than(-1)
        if self.follower.final is not None:
            return
        version = await self.follower.fetch(head)
        self._note_initial_weights(version, local_v0)
        self.trainer.load(version.tensors)
        steps = self._assigned_steps(head, self.spec.config.train.local_steps)
        claim: tuple[GlobalHead, GlobalVersion] | None = (head, version)  # phase 1 claims version 0
        self.stats.idle_s += time.perf_counter() - wait_from
        upload: asyncio.Task[None] | None = None
        upcoming: asyncio.Task[tuple[GlobalHead, GlobalVersion]] | None = None
        try:
            while not self._stop.is_set():
                if self.private is not None and not self.private.affordable(steps):
                    await self._retire(head.version)
                    break
                if claim is None:  # fetch the next version while training; correct towards it on arrival
                    start = {n: t.detach().clone() for n, t in self.trainer.weights().items()}
                    upcoming = asyncio.create_task(self._version_after(head.version, start))
                    if head.version < OVERLAP_FROM_VERSION:  # early phases wait for their version
                        wait_from = time.perf_counter()
                        await asyncio.wait([upcoming])
                        self.stats.idle_s += time.perf_counter() - wait_from
                _, result, heldout = await self._train(steps)
                wait_from = time.perf_counter()
                if claim is None:
                    assert upcoming is not None
                    claim, upcoming = await upcoming, None
                if upload is not None:
                    await upload  # one upload at a time: sequence numbers stay in order
                self.stats.idle_s += time.perf_counter() - wait_from
                head, version = claim
                if self.follower.final is not None or head.final:
                    break
                self.trainer.apply_corrections()  # a version that came after the last step
                self.metrics.version(head.version)
                self.tracker.rebase(version.tensors, head.version)  # the update is measured from it
                compressed = await asyncio.to_thread(self.tracker.compress_delta, self.trainer.weights())
                header = self._header(head.version, result, heldout)
                upload = asyncio.create_task(self._upload(header, compressed, steps, result))
                steps = self._assigned_steps(head, steps)
                claim = None
            if upload is not None and not upload.done():
                await upload
        finally:
            for task in (upload, upcoming):
                if task is not None and not task.done():
                    task.cancel()

    def _hold_version_zero(self) -> dict[str, Any]:
        """Version 0 as this cloud built it (a copy: training changes the model in place): not
        downloaded when its hash is the signed one."""
        assert self.follower is not None and self.trainer is not None
        local_v0 = {n: t.clone() for n, t in self.trainer.weights().items()}
        self.follower.hold_local(0, local_v0)
        return local_v0

    def _note_initial_weights(self, version: GlobalVersion, local_v0: dict[str, Any]) -> None:
        self.stats.initial_weights = "local" if version.tensors is local_v0 else "downloaded"

    def _assigned_steps(self, head: GlobalHead, default: int) -> int:
        """This cloud's local steps as the version's record assigns them (dynamic partition).
        Under DP the record also says how many steps this cloud has spent in all, and the
        ledger starts there (a restarted worker does not get its budget back)."""
        assert self.follower is not None
        record = self.follower.record(head)
        if self.private is not None:
            self.private.catch_up(record.progress.dp_steps.get(self.config.cloud, 0))
        return record.assignment.get(self.config.cloud, default)

    async def _version_after(self, version: int, start: dict[str, Any]) -> tuple[GlobalHead, GlobalVersion]:
        """The next global after ``version``, downloaded while the worker trains on from
        ``start``; the model is moved onto it by ``global - start`` at the next step. A final
        marker cuts the phase short instead: nothing will take its update."""
        assert self.follower is not None and self.trainer is not None
        head = await self.follower.newer_than(version)
        if self.follower.final is not None or head.final:
            self.trainer.stopping.set()
            return head, GlobalVersion(head.header, {})
        fetched = await self.follower.fetch(head)
        self.trainer.correct({n: t - start[n] for n, t in fetched.tensors.items()})
        return head, fetched

    async def _upload(self, header: UpdateHeader, compressed: Compressed, steps: int, result: StepsResult) -> None:
        with structlog.contextvars.bound_contextvars(version=header.base_version):
            await self._sent(header, steps, result, await self._publish(header, compressed))

    async def _train_and_send(self, base_version: int, steps: int) -> None:
        with structlog.contextvars.bound_contextvars(version=base_version):
            await self._train_and_send_from(base_version, steps)

    async def _train_and_send_from(self, base_version: int, steps: int) -> None:
        gradient, result, heldout = await self._train(steps)
        header = self._header(base_version, result, heldout)
        if self.secure is not None:
            sent = await self._send_masked(header, gradient)
        else:
            sent = await self._send_compressed(header, gradient)
        await self._sent(header, steps, result, sent)

    async def _train(self, steps: int) -> tuple[dict[str, Any] | None, StepsResult, float | None]:
        """One local phase: ``steps`` optimizer steps (or one mean gradient), then held-out loss."""
        spec, trainer = self.spec, self.trainer
        gradient: dict[str, Any] | None = None
        if spec.update_kind == "gradient":
            gradient, result = await asyncio.to_thread(trainer.gradient, steps)
        else:
            train = trainer.train if self.private is None else self.private.train
            result = await asyncio.to_thread(train, steps)
        # Under DP no loss leaves the worker: both are functions of the private records.
        heldout = await asyncio.to_thread(self._heldout_loss) if self.private is None else None
        return gradient, result, heldout

    def _header(self, base_version: int, result: StepsResult, heldout: float | None) -> UpdateHeader:
        spec = self.spec
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return UpdateHeader(
            job=spec.job,
            cloud=self.config.cloud,
            worker=self.config.worker_id,
            seq=self._seq,
            base_version=base_version,
            samples=self.data.samples(spec.config.train.seq_len),
            loss=result.mean_loss,
            kind=spec.update_kind,
            codec="secure-agg" if self.secure is not None else self.codec.text,
            tokens=result.tokens,
            compute_s=result.compute_s,
            wall_s=result.wall_s,
            sent_unix=time.time(),
            data_tokens=self.data.tokens,
            heldout_loss=heldout,
            dp=None if self.private is None else self.private.claim(),
        )

    async def _sent(self, header: UpdateHeader, steps: int, result: StepsResult, sent: int | None) -> None:
        """Count an update that left (``sent`` wire bytes; None: its secure round was missed)."""
        if sent is None:
            return
        self.stats.updates_sent += 1
        self.stats.bytes_up += sent
        self.metrics.sent(sent)
        if self.private is not None:
            self.stats.dp_epsilon = self.private.ledger.epsilon_spent()
            self.metrics.dp_epsilon(self.stats.dp_epsilon)
        self.stats.tokens += result.tokens
        self.stats.compute_s += result.compute_s
        log.info(
            "update_sent",
            base=header.base_version,
            steps=steps,
            loss=round(result.mean_loss, 4),
            heldout_loss=None if header.heldout_loss is None else round(header.heldout_loss, 4),
            bytes=sent,
        )
        await self._report_stats()

    async def _send_compressed(self, header: UpdateHeader, gradient: dict[str, Any] | None) -> int:
        if gradient is not None:
            compressed = await asyncio.to_thread(self.tracker.compress_gradient, gradient)
        else:
            compressed = await asyncio.to_thread(self.tracker.compress_delta, self.trainer.weights())
        return await self._publish(header, compressed)

    async def _publish(self, header: UpdateHeader, compressed: Compressed) -> int:
        published = await self.sender.send(frame_update(header, compressed.entries), header.seq)
        return published.wire_bytes

    async def _send_masked(self, header: UpdateHeader, gradient: dict[str, Any] | None) -> int | None:
        """Secure aggregation: the update leaves only masked; None when its round was missed.

        Synchronous rules measure it from the base and take only a round on that base; FedBuff
        measures it from the last send (or the last version loaded) and joins a later round
        while its staleness is within ``--max-staleness``."""
        assert self.secure is not None and self._base is not None and self.follower is not None
        head, reference = self._base
        current = self.trainer.weights()
        if gradient is None:
            gradient = {n: current[n].detach().float() - reference[n].float() for n in reference}
        buffered = not self.spec.synchronous
        slack = self.spec.strategy.max_staleness if buffered else 0
        link, before = self.secure.link, self.secure.link.bytes_sent

        def too_late() -> bool:
            follower = self.follower
            if self._stop.is_set() or follower is None or follower.final is not None:
                return True  # stopping, or the job is over: no round will open again
            return follower.latest is not None and follower.latest.version - head.version > slack

        if not await self.secure.contribute(gradient, header, head.hash, too_late, later_rounds=buffered):
            log.warning("secagg_round_missed", base=head.version)
            return None
        if buffered:  # the next delta starts where this one ended
            self._base = (head, {n: t.detach().clone() for n, t in current.items()})
        return link.bytes_sent - before

    async def _retire(self, base_version: int) -> None:
        """Out of privacy budget: tell the coordinator this cloud sends no more updates."""
        assert self.private is not None
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        header = UpdateHeader(
            job=self.spec.job, cloud=self.config.cloud, worker=self.config.worker_id, seq=self._seq,
            base_version=base_version, samples=0, loss=0.0, kind=RETIRE, dp=self.private.claim(),
        )  # fmt: skip
        await self.sender.send(frame_update(header, []), self._seq)
        self.stats.retired = True
        log.warning("privacy_budget_spent", epsilon=round(self.private.ledger.epsilon_spent(), 4))

    def _heldout_loss(self) -> float | None:
        """Loss of the freshly trained local model on this cloud's held-out slice."""
        if self.data.heldout is None:
            return None
        loss = evaluate(self.trainer.model, self.data.heldout, self.trainer.device).loss
        self.stats.heldout_loss = loss
        return loss

    async def _report_stats(self) -> None:
        """Per-cloud figures for the report, in the job's KV bucket (best effort)."""
        if self.follower is not None:
            self.metrics.received(self.follower.bytes_down - self.stats.bytes_down)
            self.stats.bytes_down = self.follower.bytes_down
        self.metrics.throughput(self.stats.tokens_per_s, self.stats.to_dict()["idle_frac"])
        if self._nc is None or self._nc.is_closed or not self._joined:
            return  # no job was found: there is no bucket to report to
        await put_stats(self._js, self.subjects, self.config.cloud, self.stats.to_dict(), domain=self.config.js_domain)
