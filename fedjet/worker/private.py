"""Record-level DP-SGD in a worker: the records, the noise, the ledger and the hard budget.

A record is one disjoint window of ``seq_len + 1`` tokens of this cloud's training text. Each
local step draws a Poisson batch of records, clips every example's gradient and adds Gaussian
noise (``fedjet.privacy.dpsgd``); ``dp-accounting`` composes every step of every update. With
``epsilon=E`` the noise is calibrated so the planned updates spend at most E, and an update that
would spend more is neither trained nor sent: the cloud retires instead.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch.distributed as dist

from fedjet.codecs.messages import DPClaim
from fedjet.config.privacy import DPConfig
from fedjet.errors import ConfigError
from fedjet.log import get_logger
from fedjet.privacy.accounting import PrivacyLedger, calibrate_noise
from fedjet.privacy.dpsgd import DPSGDStep
from fedjet.privacy.sampling import record_windows, sample_rate_for
from fedjet.spec import JobSpec
from fedjet.worker.local_data import LocalData
from fedjet.worker.ranks import GroupTrainer, RankPlace, sum_over_ranks
from fedjet.worker.train import LocalTrainer, StepsResult, threads_here, unwrapped

log = get_logger("fedjet.worker")


class PrivateTraining:
    """DP-SGD for the cloud. A cloud of several ranks draws one Poisson batch over all its
    records (each rank samples its own share at the cloud's rate), clips every example on the
    rank that holds it, and adds the noise once, here on rank 0, to the sum over the ranks; the
    sample rate and the ledger are the cloud's."""

    def __init__(self, dp: DPConfig, spec: JobSpec, data: LocalData, trainer: LocalTrainer) -> None:
        job = spec.config
        self.dp = dp
        self.trainer = trainer
        self.replicas = dist.get_world_size() if isinstance(trainer, GroupTrainer) else 1
        place = RankPlace(0, self.replicas) if self.replicas > 1 else None
        records, share, sample_rate = cloud_records(spec, data, place)
        planned_steps = job.train.local_steps * planned_updates(dp, spec)
        noise = dp.noise or calibrate_noise(dp.epsilon, sample_rate, planned_steps, dp.delta, dp.accountant)
        self.ledger = PrivacyLedger(
            sample_rate=sample_rate, noise_multiplier=noise, delta=dp.delta, accountant=dp.accountant
        )
        self.step = DPSGDStep(
            unwrapped(trainer.model), trainer.optimizer, share, sample_rate=sample_rate, clip=dp.clip,
            noise_multiplier=noise, cloud_records=len(records), adds_noise=True,
            sum_over_ranks=sum_over_ranks if place is not None else None,
        )  # fmt: skip

    def catch_up(self, recorded_steps: int) -> None:
        """Start from the steps the coordinator has recorded for this cloud (a restarted worker,
        or another worker of the same cloud, spent them): the budget is the cloud's, not the
        process's."""
        if recorded_steps > self.ledger.steps_spent:
            log.info("privacy_ledger_resumed", steps=recorded_steps, was=self.ledger.steps_spent)
            self.ledger = self.ledger.spend(recorded_steps - self.ledger.steps_spent)

    def affordable(self, steps: int) -> bool:
        """The hard limit: False means the next update must be neither trained nor sent."""
        return self.dp.epsilon is None or self.ledger.can_afford(steps, self.dp.epsilon)

    def train(self, steps: int) -> StepsResult:
        """``steps`` DP-SGD steps. The reported loss is 0: a training loss is a function of the
        private records that DP-SGD does not cover."""
        threads_here()
        trainer = self.trainer
        trainer.model.train()
        started = time.perf_counter()
        taken = trainer.run_steps(steps, self.step.step)
        self.ledger = self.ledger.spend(taken)  # spent even if the update is later dropped
        compute = time.perf_counter() - started
        sequences = round(taken * self.step.expected_batch)
        return StepsResult(
            0.0, sequences, sequences * trainer.settings.seq_len, compute, compute, replicas=self.replicas
        )

    def claim(self) -> DPClaim:
        return DPClaim(
            epsilon=self.ledger.epsilon_spent(),
            delta=self.ledger.delta,
            noise=self.ledger.noise_multiplier,
            sample_rate=self.ledger.sample_rate,
            clip=self.dp.clip,
            steps=self.ledger.steps_spent,
            accountant=self.ledger.accountant,
        )


def planned_updates(dp: DPConfig, spec: JobSpec) -> int:
    """Updates one cloud plans to send: ``updates=K``, else one per round, else its share of
    ``--max-updates``."""
    stop = spec.config.stop
    if dp.updates is not None:
        return dp.updates
    if stop.rounds is not None:
        return stop.rounds
    assert stop.max_updates is not None
    return math.ceil(stop.max_updates / len(spec.clouds))


def cloud_records(spec: JobSpec, data: LocalData, place: RankPlace | None) -> tuple[np.ndarray, np.ndarray, float]:
    """The cloud's records, this rank's share of them (every ``world``-th, from its rank) and
    the cloud's sample rate: a batch of ``batch_size`` records per rank, drawn from them all."""
    train = spec.config.train
    records = record_windows(data.train, train.seq_len)
    world = 1 if place is None else place.world
    share = records if place is None else records[place.rank :: place.world]
    if len(share) == 0:
        raise ConfigError(f"{len(records)} records do not give each of {world} ranks one")
    return records, share, sample_rate_for(min(train.batch_size * world, len(records)), len(records))


def follower_step(spec: JobSpec, data: LocalData, trainer: LocalTrainer, place: RankPlace) -> DPSGDStep:
    """A rank > 0's DP-SGD: its share at the cloud's rate, clipped here, summed into rank 0's
    (which alone adds the noise)."""
    dp = spec.config.dp_config
    assert dp is not None
    records, share, sample_rate = cloud_records(spec, data, place)
    return DPSGDStep(
        unwrapped(trainer.model), trainer.optimizer, share, sample_rate=sample_rate, clip=dp.clip,
        noise_multiplier=0.0, cloud_records=len(records), sum_over_ranks=sum_over_ranks, adds_noise=False,
    )  # fmt: skip
