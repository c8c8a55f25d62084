"""The secure-aggregation envelope and steps: typed errors for anything malformed or forged,
and a member that will not join a round weaker than the job agreed on."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from fedjet.codecs.crypto import COORDINATOR, open_secagg, open_update, seal_secagg, seal_update
from fedjet.config.secure_agg import SecureAggConfig
from fedjet.errors import AuthenticationError, DecodeError, LimitError, SchemaError
from fedjet.secagg.errors import SecAggProtocolError, SecAggSchemaError
from fedjet.secagg.steps import ATTEMPTS, Step, agreed_indices, read_open, round_id
from fedjet.worker.secure import SecureMember
from tests.conftest import make_parties

CLOUDS = ("aws", "azure", "gcp")


def test_a_step_round_trips_and_its_round_belongs_to_its_base():
    step = Step(kind="open", round_id=round_id(4, 7), base_version=4, extra={"members": list(CLOUDS)})
    assert Step.from_bytes(step.to_bytes()) == step
    with pytest.raises(SecAggSchemaError):
        Step(kind="open", round_id=round_id(3, 7), base_version=4)
    with pytest.raises(SecAggSchemaError):
        Step(kind="launch", round_id=0, base_version=0)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, "kind": "open", "round": 0, "base": 0, "body": {}, "extra": {}}),
        msgpack.packb({"v": 1, "kind": "open", "round": True, "base": 0, "body": {}, "extra": {}}),
        msgpack.packb({"v": 1, "kind": "open", "round": 0, "base": 0, "body": [], "extra": {}}),
        msgpack.packb({"v": 1, "kind": "open", "round": ATTEMPTS, "base": 0, "body": {}, "extra": {}}),
    ],
)
def test_malformed_steps_are_schema_errors(raw):
    with pytest.raises(SecAggSchemaError):
        Step.from_bytes(raw)


def test_envelopes_refuse_non_members_forgeries_and_the_update_domain():
    coord, members = make_parties(CLOUDS)
    sealed = seal_secagg(b"payload", members["aws"], COORDINATOR)
    assert open_secagg(sealed, coord, 1 << 20, senders=CLOUDS) == ("aws", b"payload")
    with pytest.raises(AuthenticationError):
        open_secagg(sealed, coord, 1 << 20, senders=("gcp",))  # refused before any key is used
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(AuthenticationError):
        open_secagg(forged, coord, 1 << 20, senders=CLOUDS)
    with pytest.raises(LimitError):
        open_secagg(sealed, coord, 16, senders=CLOUDS)
    with pytest.raises(DecodeError):
        open_secagg(b"FJE" + sealed[3:], coord, 1 << 20, senders=CLOUDS)
    update = seal_update(b"frame", members["aws"])  # another key domain: never opens as a step
    with pytest.raises((AuthenticationError, DecodeError)):
        open_secagg(b"FJS\x01" + update[4:], coord, 1 << 20, senders=CLOUDS)
    with pytest.raises((AuthenticationError, DecodeError, SchemaError)):  # SchemaError: an envelope version
        open_update(b"FJE\x03" + sealed[4:], coord, 1 << 20)  # this build no longer reads
    with pytest.raises((AuthenticationError, DecodeError)):
        open_update(b"FJE\x02" + sealed[4:], coord, 1 << 20, legacy=True)


def test_agreed_indices_are_shared_and_change_with_the_base():
    a = agreed_indices("job", "hash-1", 10_000, 100)
    assert (a == agreed_indices("job", "hash-1", 10_000, 100)).all() and len(set(a.tolist())) == 100
    assert not (a == agreed_indices("job", "hash-2", 10_000, 100)).all()
    assert (agreed_indices("job", "hash-1", 50, 50) == range(50)).all()


class _Link:
    def __init__(self, steps):
        self.steps, self.sent = list(steps), []

    async def receive(self, timeout):
        from fedjet.channel.secagg import Arrived

        return Arrived(COORDINATOR, self.steps.pop(0), 1, 1) if self.steps else None

    async def send(self, to, step):
        self.sent.append(step)
        return 1


def test_a_member_does_not_join_a_round_weaker_than_the_job_agreed_on():
    _, members = make_parties(CLOUDS)
    weak = Step(kind="open", round_id=round_id(0, 1), base_version=0,
                extra={"members": list(CLOUDS), "threshold": 1, "numel": 8})  # fmt: skip
    assert read_open(weak) == (CLOUDS, 1, 8)
    link = _Link([weak])
    member = SecureMember(link, job="j", cloud="aws", clouds=CLOUDS, config=SecureAggConfig(),
                          signing_key=members["aws"].me.sign, verify_keys={})  # fmt: skip
    with pytest.raises(SecAggProtocolError, match="threshold 1"):
        asyncio.run(member._round(weak, np.zeros(8, dtype=np.float32), None, lambda: False))
    assert link.sent == []  # nothing about its update left the member
