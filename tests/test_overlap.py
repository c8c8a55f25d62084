"""``--schedule overlap``: workers train the next local phase while the last update uploads and
the version it goes into is made and downloaded; every update still lands in its own round."""

from __future__ import annotations

import pytest
import torch

from fedjet.config.flags import job_config
from fedjet.config.job import TrainConfig
from fedjet.data.batches import BatchSampler, encode_articles
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.data.wikitext import load_directory
from fedjet.errors import ConfigError
from fedjet.models.build import initial_model
from fedjet.models.job_model import JobModel
from fedjet.worker.train import LocalTrainer
from tests.test_e2e_up import up

SMALL_ROUNDS = ["--rounds", "3", "--codec", "dense", "--eval-every", "1"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": {"name": "async"}},
        {"strategy": {"name": "fedbuff"}},
        {"strategy": {"name": "gradient"}},
        {"secure_agg": "threshold=2"},
    ],
)
def test_overlap_is_refused_where_it_has_no_meaning(overrides):
    with pytest.raises(ConfigError, match="--schedule overlap"):
        job_config(overrides={"train": {"schedule": "overlap"}, **overrides})


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="--schedule"):
        job_config(overrides={"train": {"schedule": "eager"}})


@pytest.mark.e2e
def test_overlapped_workers_land_every_update_in_its_round_and_lower_the_loss(tmp_path_factory, data_dir):
    _, report, _ = up(tmp_path_factory, data_dir, *SMALL_ROUNDS, "--schedule", "overlap")
    assert report["config"]["train"]["schedule"] == "overlap"
    rounds = report["rounds"]
    assert [r["version"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds[1:]:
        assert sorted(r["contributors"]) == ["aws", "azure", "gcp"]
        assert r["staleness"] == [0, 0, 0]  # each claimed the version before its round, and it was
    summary = report["summary"]
    assert summary["updates_applied"] == 9 and summary["updates_rejected"] == 0
    losses = [r["eval_loss"] for r in rounds]
    assert losses[3] < losses[2] < losses[1] < losses[0]


def _trainer(data_dir, lr: float = 3e-3):
    corpus = load_directory(data_dir)
    tok = ByteTokenizer()
    tokens = encode_articles(corpus.train[:3], tok)
    settings = TrainConfig(local_steps=4, batch_size=2, seq_len=32, lr=lr)
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    return LocalTrainer(JobModel(model, tok), BatchSampler(tokens, 32, 2, seed=0), settings, torch.device("cpu"))


def test_a_correction_moves_the_weights_by_exactly_the_change_once(data_dir):
    trainer = _trainer(data_dir)
    before = {n: t.clone() for n, t in trainer.weights().items()}
    change = {n: torch.full_like(t, 0.25) for n, t in before.items()}
    assert trainer.apply_corrections() is False
    trainer.correct(change)
    trainer.correct(change)
    assert trainer.apply_corrections() is True
    after = trainer.weights()
    assert all(torch.allclose(after[n], before[n] + 0.5) for n in before)
    assert trainer.apply_corrections() is False  # applied once, not again


def test_a_correction_queued_while_training_lands_before_the_next_step(data_dir):
    """A global arriving mid-phase: with lr 0 the steps change nothing, so the weights after the
    phase are the start plus the change, whichever step it arrived before."""
    trainer = _trainer(data_dir, lr=1e-12)
    start = {n: t.clone() for n, t in trainer.weights().items()}
    change = {n: torch.full_like(t, -1.0) for n, t in start.items()}
    steps = {"n": 0}
    original = trainer._batch

    def batch():
        steps["n"] += 1
        if steps["n"] == 2:
            trainer.correct(change)  # as the event loop does when a version is fetched
        return original()

    trainer._batch = batch  # type: ignore[method-assign]
    trainer.train(4)
    after = trainer.weights()
    assert all(torch.allclose(after[n], start[n] - 1.0, atol=1e-6) for n in start)
    assert trainer.apply_corrections() is False
