"""What a worker prepared for one job once its spec was read: the model, this cloud's data, the
trainer and the update codec. Built once, before the first version, and never replaced."""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.config.codec import CodecSpec
from fedjet.models.job_model import JobModel
from fedjet.spec import JobSpec
from fedjet.worker.delta import DeltaTracker
from fedjet.worker.local_data import LocalData
from fedjet.worker.private import PrivateTraining
from fedjet.worker.train import LocalTrainer


@dataclass(frozen=True)
class LocalJob:
    spec: JobSpec
    job_model: JobModel
    data: LocalData
    trainer: LocalTrainer
    tracker: DeltaTracker
    codec: CodecSpec
    private: PrivateTraining | None  # a DP job's ledger and private training, else None
