"""The worker daemon: one per cloud. Follows globals, trains locally, publishes updates.

Raw text never leaves this process: only encoded (and, with keys, encrypted) weight deltas or
gradients are published, to this cloud's own update subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from fedjet.broker.auth import ClientAuth
from fedjet.broker.connect import RECONNECT_WINDOW_S, NatsTarget, check_reconnect_window, open_target
from fedjet.broker.jetstream import close_quietly
from fedjet.broker.socket_bytes import PeakRate, socket_bytes_of
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.island import IslandLink
from fedjet.channel.kv import await_spec, put_stats
from fedjet.channel.secagg import SecAggLink, secagg_max_bytes
from fedjet.channel.updates import UpdateSender
from fedjet.codecs.crypto import COORDINATOR
from fedjet.codecs.frame import Limits
from fedjet.config.codec import CodecSpec
from fedjet.config.job import check_shardable
from fedjet.config.names import check_token
from fedjet.data.batches import BatchSampler
from fedjet.errors import ConfigError, RankLostError
from fedjet.keystore import load_public, member_boxes
from fedjet.lifetime import peak_rss_mb, process_lifetime_s
from fedjet.log import get_logger
from fedjet.metrics import WorkerMetrics
from fedjet.models.build import pick_device
from fedjet.models.job_model import job_model_for
from fedjet.spec import JobSpec
from fedjet.worker.cluster import Ranks, RankSettings, send_spec, start_ranks
from fedjet.worker.delta import DeltaTracker
from fedjet.worker.job import LocalJob
from fedjet.worker.local_data import cloud_data, cloud_sampler
from fedjet.worker.loops import TrainingLoops
from fedjet.worker.private import PrivateTraining
from fedjet.worker.ranks import (
    KEEP_ALIVE_S,
    GroupTrainer,
    RankPlace,
    RankSlice,
    data_parallel,
    join_group,
    shard_model,
)  # fmt: skip
from fedjet.worker.secure import SecureMember
from fedjet.worker.train import LocalTrainer
from fedjet.worker.uplink import Uplink, WorkerStats

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
    nproc_per_node: int = 1  # ranks of this cloud's group (torch.distributed); rank 0 is this process
    launched: bool = False  # the ranks were started by a launcher (torchrun), not by this worker
    shard: bool = False  # FSDP2 over the ranks instead of DDP (a model that does not fit one device)

    def __post_init__(self) -> None:
        check_token("job", self.job)
        check_token("cloud", self.cloud)
        check_token("worker", self.worker_id)
        if self.slowdown < 1.0:
            raise ConfigError(f"slowdown must be >= 1, got {self.slowdown}")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.shard and self.nproc_per_node < 2:
            raise ConfigError("--shard splits the model over the cloud's ranks: give --nproc-per-node >= 2")
        check_reconnect_window(self.reconnect_window_s)


class Worker:
    """One cloud's worker: connects, waits for the job's spec, prepares the model and the data,
    then runs the job's schedule until the final version or a stop."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.subjects = JobSubjects(config.job)
        self.boxes = member_boxes(config.keys, config.cloud)
        self.stats = WorkerStats(config.cloud)
        self.metrics = config.metrics or WorkerMetrics(config.cloud)  # a private registry unless served
        self._stop = asyncio.Event()
        self._nc: Any = None
        self._js: Any = None
        self._peak_up: PeakRate | None = None
        self.spec: JobSpec | None = None  # read and checked: the job's bucket exists to report stats to
        self.job: LocalJob | None = None
        self.follower: GlobalFollower | None = None
        self.secure: SecureMember | None = None
        self.island: IslandLink | None = None
        self.ranks: Ranks | None = None  # --nproc-per-node > 1: the cloud's other ranks (None: a launcher's)
        self._grouped = False  # this process joined its cloud's group of ranks
        self._rank_failure: RuntimeError | None = None  # a keep-alive to the other ranks failed

    @property
    def grouped(self) -> bool:
        """This process joined its cloud's group of ranks (it is rank 0)."""
        return self._grouped

    def stop(self) -> None:
        self._stop.set()
        if self.job is not None:
            self.job.trainer.stopping.set()

    async def run(self) -> WorkerStats:
        started = time.perf_counter()
        cfg = self.config
        target = NatsTarget(
            url=cfg.nats_url, auth=cfg.auth, domain=cfg.js_domain, reconnect_window_s=cfg.reconnect_window_s
        )
        self._nc, self._js = await open_target(target, f"fedjet-worker-{cfg.job}-{cfg.cloud}")
        self._peak_up = PeakRate(self._nc)
        sampling = asyncio.create_task(self._peak_up.run())
        keeping = asyncio.create_task(self._keep_ranks_alive()) if cfg.nproc_per_node > 1 else None
        try:
            with structlog.contextvars.bound_contextvars(job=cfg.job, cloud=cfg.cloud):
                await self._serve()
            if self._rank_failure is not None:
                raise self._rank_failure
        except RuntimeError as e:  # a collective of the group failed: name the rank that died
            if not self._grouped:
                raise
            lost = []  # a launcher's ranks: the launcher knows which, and ends the others
            if self.ranks is not None:
                lost = await asyncio.to_thread(self.ranks.lost_within, 3.0)  # its socket closes before it is reaped
            log.error("rank_lost", ranks=lost, error=str(e)[:300])
            raise RankLostError(f"rank(s) {lost or '?'} of cloud {cfg.cloud} died; restart the worker") from e
        finally:
            sampling.cancel()
            if keeping is not None:
                keeping.cancel()
            self.stats.wall_s = time.perf_counter() - started
            if self.follower is not None:
                await self.follower.stop()
            if self.secure is not None:
                await self.secure.link.stop()
            await self._report_stats()
            if self.island is not None:
                await self.island.stop()
            await asyncio.to_thread(self._release_ranks)
            await close_quietly(self._nc)
        return self.stats

    async def _serve(self) -> None:
        cfg = self.config
        island = self.island = await IslandLink.detect(self._nc, self._js, self.subjects, cfg.cloud, cfg.js_domain)
        # The spec from the hub; from this leaf's mirror of it when a restart finds the link cut.
        hub_away = island is not None and not await island.link_up()
        spec_from = island.local if island is not None and hub_away else self._js
        spec = await await_spec(spec_from, self.subjects, self.boxes.public_of(COORDINATOR), cfg.spec_timeout_s)
        spec.cloud_index(cfg.cloud)
        self.spec = spec
        if island is not None:  # the leaf's own JetStream: updates wait there, versions and spec are mirrored
            await island.prepare()  # after the spec: the hub's streams exist, so the mirrors start at once
            island.start_announcing()  # the coordinator then sources this leaf's updates
            self.stats.island = True
        reads = island.local if island is not None else self._js
        job = self.job = await asyncio.to_thread(self._prepare, spec)
        sender = UpdateSender(
            reads, self.subjects, self.boxes, cfg.cloud, cfg.worker_id, max_payload=self._nc.max_payload,
            subject=None if island is None else island.update_subject,
        )  # fmt: skip
        own = job.trainer.weights()  # frame limits sized from the model, not 1 GiB
        limits = Limits.for_model(sum(t.numel() for t in own.values()), len(own))
        follower = self.follower = GlobalFollower(reads, self.subjects, self.boxes, limits, views=True)
        await follower.start()
        await self._start_secure(spec, own)
        uplink = Uplink(
            job, sender, worker_id=cfg.worker_id, follower=follower, secure=self.secure, stopping=self._stop,
            stats=self.stats, metrics=self.metrics, report=self._report_stats,
        )  # fmt: skip
        # Secure rounds need every member online: a cut-off cloud of a secure job waits instead.
        trains_on = island if spec.config.secure_agg is None and spec.config.train.schedule == "wait" else None
        loops = TrainingLoops(
            job, follower, uplink, stats=self.stats, metrics=self.metrics, stopping=self._stop, island=trains_on
        )
        await loops.run()

    async def _start_secure(self, spec: JobSpec, own: dict[str, Any]) -> None:
        """A secure-aggregation job: listen for the coordinator's rounds from now on."""
        config = spec.config.secure_agg_config
        if config is None:
            return
        numel = sum(t.numel() for t in own.values())
        link = SecAggLink(
            self._js, self.subjects, self.boxes, peers=(COORDINATOR,),
            max_bytes=secagg_max_bytes(len(spec.clouds), config.numel_masked(numel)),
            max_payload=self._nc.max_payload,
        )  # fmt: skip
        verify_keys = {c: load_public(self.config.keys, c).verify for c in spec.clouds}
        await link.start()
        self.secure = SecureMember(
            link, job=spec.job, cloud=self.config.cloud, clouds=spec.clouds, config=config,
            signing_key=self.boxes.me.sign, verify_keys=verify_keys,
            staleness=spec.strategy.staleness, max_staleness=spec.strategy.max_staleness,
        )  # fmt: skip

    def _prepare(self, spec: JobSpec) -> LocalJob:
        cfg, job = self.config, spec.config
        job_model = job_model_for(spec, cfg.model)
        data = cloud_data(cfg.data, job_model.tokenizer, spec, cfg.cloud, deal=cfg.deal)
        world = cfg.nproc_per_node
        sampler = cloud_sampler(data, spec, cfg.cloud, world)
        device = pick_device(cfg.device)
        if world == 1:
            trainer = LocalTrainer(
                job_model, sampler, job.train, device, slowdown=cfg.slowdown, precision=cfg.precision
            )
        else:
            trainer = self._group_trainer(spec, job_model, sampler, device)
        codec = CodecSpec.parse(job.codec)
        dp = job.dp_config
        private = None if dp is None else PrivateTraining(dp, spec, data, trainer)
        self.stats.data_documents, self.stats.data_tokens = data.documents, data.tokens
        log.info(
            "worker_ready",
            documents=data.documents,
            tokens=data.tokens,
            skipped=data.skipped,
            source=data.source,
            note=data.note,
            device=str(device),
            precision=trainer.precision,
        )
        tracker = DeltaTracker(codec, reference=spec.delta_reference)
        return LocalJob(spec, job_model, data, trainer, tracker, codec, private)

    def _group_trainer(self, spec: JobSpec, job_model: Any, sampler: BatchSampler, device: Any) -> LocalTrainer:
        """Rank 0 of ``--nproc-per-node`` ranks (the others started here) or of the ranks a
        launcher started (they get the spec from here): the group joined, DDP."""
        cfg, world = self.config, self.config.nproc_per_node
        if cfg.shard:
            check_shardable(spec.config)  # before any rank starts
        settings = RankSettings(
            cloud=cfg.cloud, data=cfg.data, deal=cfg.deal, model=cfg.model, device=cfg.device, precision=cfg.precision,
            shard=cfg.shard,
        )  # fmt: skip
        place = RankPlace(0, world)
        if cfg.launched:
            device = join_group(place, "env://", device)
            send_spec(spec.to_bytes(), device)
        else:
            self.ranks = start_ranks(world, spec.to_bytes(), settings)
            device = join_group(place, self.ranks.init_method, device)
        self._grouped = True
        if cfg.shard:
            shard_model(job_model.model)  # before the optimizer is made over its parameters
        trainer = GroupTrainer(
            job_model, RankSlice(sampler, place), spec.config.train, device, slowdown=cfg.slowdown,  # type: ignore[arg-type]
            precision=cfg.precision,
        )  # fmt: skip
        if cfg.shard:
            trainer.sharded = True
        else:
            trainer.model = data_parallel(trainer.model, device)
        return trainer

    async def _keep_ranks_alive(self) -> None:
        """While the worker waits between phases, the other ranks hear from rank 0 (see
        :meth:`GroupTrainer.keep_alive`); a keep-alive that fails (a rank died) stops the
        worker, which then names the lost rank."""
        while True:
            await asyncio.sleep(KEEP_ALIVE_S)
            trainer = self.job.trainer if self.job is not None else None
            if not isinstance(trainer, GroupTrainer):
                continue
            try:
                await asyncio.to_thread(trainer.keep_alive)
            except RuntimeError as e:
                self._rank_failure = e
                self.stop()
                return

    def _release_ranks(self) -> None:
        """The other ranks leave (told so when they can still hear it), then the group ends."""
        if not self._grouped:
            return
        import torch.distributed as dist

        trainer = self.job.trainer if self.job is not None else None
        with contextlib.suppress(RuntimeError, ValueError):
            if isinstance(trainer, GroupTrainer) and not (self.ranks is not None and self.ranks.lost()):
                trainer.release()
            dist.destroy_process_group()
        if self.ranks is not None:
            self.ranks.stop()

    def _peak_device_mb(self) -> float | None:
        """The most memory torch held at once on this worker's CUDA device (None elsewhere)."""
        device = getattr(self.job.trainer, "device", None) if self.job is not None else None
        if device is None or device.type != "cuda":
            return None
        import torch

        return float(torch.cuda.max_memory_allocated(device)) / 2**20

    async def _report_stats(self) -> None:
        """Per-cloud figures for the report, in the job's KV bucket (best effort)."""
        self.stats.lifetime_s = process_lifetime_s()
        self.stats.peak_rss_mb = peak_rss_mb()
        self.stats.peak_device_mb = self._peak_device_mb()
        if self._nc is not None:
            counted = socket_bytes_of(self._nc)
            self.stats.socket_in, self.stats.socket_out = counted.received, counted.sent
            self.stats.peak_up_bytes_per_s = self._peak_up.peak if self._peak_up is not None else 0.0
        if self.follower is not None:
            self.metrics.received(self.follower.bytes_down - self.stats.bytes_down)
            self.stats.bytes_down = self.follower.bytes_down
        self.metrics.throughput(self.stats.tokens_per_s, self.stats.to_dict()["idle_frac"])
        if self._nc is None or self._nc.is_closed or self.spec is None:
            return  # no job was found: there is no bucket to report to
        if not self._nc.is_connected:  # the broker is gone (or coming back): a put would wait out its timeouts
            log.warning("stats_not_reported", cloud=self.config.cloud, error="not connected to NATS")
            return
        if self.island is not None and not await self.island.link_up():  # an island: the hub's bucket is away
            log.info("stats_not_reported", cloud=self.config.cloud, error="cut off from the hub (island)")
            return
        await put_stats(self._js, self.subjects, self.config.cloud, self.stats.to_dict(), domain=self.config.js_domain)
