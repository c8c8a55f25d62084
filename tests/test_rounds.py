"""When the coordinator folds: sync rounds, deadlines with a quorum, late updates, buffers."""

from __future__ import annotations

import pytest

from fedjet.config.job import JobConfig, RoundConfig
from fedjet.coordinator.rounds import Batcher
from fedjet.errors import ConfigError, StaleUpdateError

CLOUDS = ("aws", "gcp", "azure")


def test_sync_round_waits_for_every_cloud():
    b = Batcher(synchronous=True, clouds=CLOUDS)
    b.start_round(0.0)
    b.offer("aws", 0, "a")
    b.offer("gcp", 0, "g")
    assert not b.ready(1000.0)  # no deadline: wait as long as it takes
    b.offer("azure", 0, "z")
    assert b.ready(1.0)
    assert b.take() == [(0, "a"), (0, "g"), (0, "z")] and b.pending == 0


def test_deadline_closes_a_round_with_a_quorum_only():
    b = Batcher(synchronous=True, clouds=CLOUDS, policy=RoundConfig(quorum=2, deadline_s=5.0))
    b.start_round(10.0)
    b.offer("aws", 0, "a")
    assert not b.ready(16.0)  # deadline passed but only one cloud
    b.offer("gcp", 0, "g")
    assert not b.ready(14.0) and b.ready(15.0)


def test_late_updates_are_dropped_or_carried_as_stale():
    drop = Batcher(synchronous=True, clouds=CLOUDS, policy=RoundConfig(late="drop"))
    with pytest.raises(StaleUpdateError, match="late"):
        drop.offer("azure", 1, "old")
    carry = Batcher(synchronous=True, clouds=CLOUDS, policy=RoundConfig(late="carry"))
    carry.offer("azure", 1, "old")
    assert carry.pending_items() == ["old"]
    assert carry.offer("azure", 0, "fresh") == "old"  # the fresh update replaces the carried one
    assert carry.pending_items() == ["fresh"]
    with pytest.raises(StaleUpdateError, match="already reported"):
        carry.offer("azure", 0, "again")


def test_buffers_release_k_updates_in_arrival_order():
    b = Batcher(synchronous=False, clouds=CLOUDS, size=2)
    b.offer("aws", 0, 1)
    assert not b.ready(0)
    b.offer("aws", 1, 2)
    b.offer("gcp", 3, 3)
    assert b.ready(0) and b.take() == [(0, 1), (1, 2)] and b.pending_items() == [3]


def test_policy_flags_are_validated():
    with pytest.raises(ConfigError, match="quorum"):
        JobConfig(clouds=CLOUDS, round=RoundConfig(quorum=4))
    with pytest.raises(ConfigError, match="late"):
        RoundConfig(late="keep")
    with pytest.raises(ConfigError, match="deadline"):
        RoundConfig(deadline_s=0)
