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

from fedjet.codecs.messages import DPClaim
from fedjet.config.privacy import DPConfig
from fedjet.log import get_logger
from fedjet.privacy.accounting import PrivacyLedger, calibrate_noise
from fedjet.privacy.dpsgd import DPSGDStep
from fedjet.privacy.sampling import record_windows, sample_rate_for
from fedjet.spec import JobSpec
from fedjet.worker.local_data import LocalData
from fedjet.worker.train import LocalTrainer, StepsResult

log = get_logger("fedjet.worker")


class PrivateTraining:
    def __init__(self, dp: DPConfig, spec: JobSpec, data: LocalData, trainer: LocalTrainer) -> None:
        job = spec.config
        self.dp = dp
        self.trainer = trainer
        records = record_windows(data.train, job.train.seq_len)
        sample_rate = sample_rate_for(min(job.train.batch_size, len(records)), len(records))
        planned_steps = job.train.local_steps * planned_updates(dp, spec)
        noise = dp.noise or calibrate_noise(dp.epsilon, sample_rate, planned_steps, dp.delta, dp.accountant)
        self.ledger = PrivacyLedger(
            sample_rate=sample_rate, noise_multiplier=noise, delta=dp.delta, accountant=dp.accountant
        )
        self.step = DPSGDStep(
            trainer.model, trainer.optimizer, records,
            sample_rate=sample_rate, clip=dp.clip, noise_multiplier=noise,
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
        self.trainer.model.train()
        started, taken = time.perf_counter(), 0
        for _ in range(steps):
            if self.trainer.stopping.is_set():
                break
            self.step.step()
            taken += 1
        self.ledger = self.ledger.spend(taken)  # spent even if the update is later dropped
        compute = time.perf_counter() - started
        sequences = round(taken * self.step.expected_batch)
        return StepsResult(0.0, sequences, sequences * self.trainer.settings.seq_len, compute, compute)

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
