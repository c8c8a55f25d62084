"""What a version record withholds from the members who can open it: every cloud's loss and
the central-DP noise key, readable with the coordinator's key alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
from nacl.public import PrivateKey

from fedjet.codecs.record import ContributionRecord, VersionRecord
from fedjet.codecs.withheld import coordinator_only, disclosed, withhold
from fedjet.errors import AuthenticationError


def record() -> VersionRecord:
    contributions = tuple(
        ContributionRecord(cloud=c, seq=1, stream_seq=i, base=0, staleness=0, samples=10, loss=2.0 + i,
                           heldout_loss=3.0 + i)
        for i, c in enumerate(("aws", "gcp", "azure"))
    )  # fmt: skip
    return VersionRecord(strategy="fedavg", contributions=contributions, train_loss=3.0)


def test_members_read_no_loss_and_no_noise_key_the_coordinator_reads_both():
    coordinator, member = PrivateKey.generate(), PrivateKey.generate()
    original, key = record(), bytes(range(32))
    sent = VersionRecord.from_bytes(withhold(original, coordinator.public_key, noise_key=key).to_bytes())
    assert sent.train_loss is None
    assert all(c.loss == 0.0 and c.heldout_loss is None for c in sent.contributions)
    assert b"\x00\x01\x02\x03" not in sent.to_bytes()  # the key is not there in the clear
    with pytest.raises(AuthenticationError):
        coordinator_only(sent, member)  # a member's key opens nothing
    assert coordinator_only(sent, coordinator).noise_key == key
    assert replace(disclosed(sent, coordinator), coordinator_only=b"") == original


def test_a_record_from_before_the_withheld_part_reads_as_it_was():
    assert disclosed(record(), PrivateKey.generate()) == record()
