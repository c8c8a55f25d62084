"""Someone who can publish but holds no key: nothing beyond a fixed, tiny header is parsed before
the Box opens, frame limits follow the model's size, and the two uses of a key pair (updates,
wrapped version keys) can never stand in for each other."""

from __future__ import annotations

import asyncio
import tracemalloc

import msgpack
import pytest
import torch
from nacl.public import Box

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.crypto import COORDINATOR, ReplayGuard
from fedjet.codecs.frame import FRAME_HEADROOM, Limits
from fedjet.codecs.messages import Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.config.job import JobConfig, StopConfig, TrainConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.errors import AuthenticationError, CodecError, LimitError, SchemaError
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, make_parties

CLOUDS = ("aws", "gcp")
SPEC = JobSpec(config=JobConfig(job="env", clouds=CLOUDS, observers=("eval",), codec="topk:0.01+int8"), model_config={})
LIMITS = Limits.for_model(1020, 2)


def frame(cloud: str = "aws", seq: int = 1, value: float = 0.01) -> bytes:
    header = UpdateHeader(job="env", cloud=cloud, worker="0", seq=seq, base_version=0, samples=8, loss=2.0)
    tensors = {n: torch.full(t.shape, value) for n, t in WEIGHTS.items()}
    return encode_update(Update(header, tensors), CodecSpec.parse("topk:0.01+int8"))


def admit(envelope: bytes, coord, subject_cloud: str = "aws", *, legacy: bool = False):
    admission = Admission(SPEC, coord, LIMITS, legacy_envelopes=legacy)
    return admission.admit(envelope, subject_cloud, WEIGHTS, lambda base: 0, ReplayGuard())


def peak_bytes_while(fn) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        fn()
        error = None
    except CodecError as e:
        error = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


def test_nothing_but_the_fixed_header_is_parsed_before_the_box_opens():
    """A megabyte of empty msgpack maps used to become ~70 MB of Python objects before
    authentication; now it costs a small multiple of its size and ends in a typed error."""
    coord, _ = make_parties(CLOUDS)
    maps = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20)  # array32 of 1 Mi empty maps
    poison = [
        b"\x83\xa2ev\x01\xa4from\xa3aws\xa2ct" + maps,  # the old envelope's layout, maps for a ciphertext
        b"FJE\x02\x03aws" + maps,  # the current header, maps for a ciphertext
        maps,
    ]
    for envelope in poison:
        peak, error = peak_bytes_while(lambda e=envelope: admit(e, coord, legacy=True))
        assert isinstance(error, CodecError)
        assert peak < 4 * len(envelope), f"{peak} bytes held to reject {len(envelope)}"


def test_frame_limits_follow_the_model_size():
    limits = Limits.for_model(1_000_000, 12)
    assert limits.max_frame_bytes == 2 * 4 * 1_000_000 + FRAME_HEADROOM
    assert limits.max_total_elements == 1_000_000 and limits.max_tensors == 12
    coord, members = make_parties(CLOUDS)
    too_big = crypto.seal_update(b"\x00" * (LIMITS.max_frame_bytes + 1), members["aws"])
    with pytest.raises(LimitError):
        admit(too_big, coord)


def test_the_live_coordinator_derives_its_limits_from_the_initial_weights(nats_url):
    coord, members = make_parties(CLOUDS)
    job = JobConfig(job="env", clouds=CLOUDS, observers=(), codec="topk:0.01+int8",
                    train=TrainConfig(local_steps=1), stop=StopConfig(rounds=1))  # fmt: skip
    coordinator = Coordinator(
        CoordinatorConfig(nats_url=nats_url, spec=JobSpec(config=job, model_config={}), boxes=coord, idle_timeout_s=30)
    )
    subjects = JobSubjects("env")

    async def scenario():
        nc = await connect(nats_url, "clouds")
        js = nc.jetstream()
        try:
            task = asyncio.create_task(coordinator.run(dict(WEIGHTS)))
            await asyncio.wait_for(coordinator.serving.wait(), 30)
            assert coordinator.limits == Limits.for_model(1020, 2)
            poison = b"FJE\x02\x03aws" + b"\x80" * (2 * LIMITS.max_frame_bytes)  # beyond this model's frames
            await publish_blob(js, subjects.update("aws"), poison, blob_id="poison", max_payload=nc.max_payload)
            for n, cloud in enumerate(CLOUDS):
                envelope = crypto.seal_update(frame(cloud, 5 + n), members[cloud])
                await publish_blob(js, subjects.update(cloud), envelope, blob_id=cloud, max_payload=nc.max_payload)
            ledger = await asyncio.wait_for(task, 60)
            info = await js.consumer_info(subjects.update_stream, subjects.coordinator_durable)
        finally:
            await close_quietly(nc)
        return ledger, info

    ledger, info = asyncio.run(scenario())
    assert ledger.applied == 2 and ledger.rejected == {"BlobError": 3}  # each poison chunk refused alone
    assert info.num_ack_pending == 0  # nothing poisonous is left for a restarted coordinator


def test_a_heads_wrapped_version_key_never_opens_as_an_update_nor_the_reverse():
    coord, members = make_parties(CLOUDS)
    sealed = crypto.seal_global(b"weights", b"record", coord, list(CLOUDS))
    wrapped = sealed.keys["aws"]  # Box(coordinator, aws) over the version key
    with pytest.raises(AuthenticationError):  # as a version-2 update (what replay still reads)
        crypto.open_update(b"FJE\x02\x03aws" + wrapped, coord, 1 << 20, legacy=True)
    with pytest.raises(SchemaError):  # and version 2 is refused live
        admit(b"FJE\x02\x03aws" + wrapped, coord)
    salt_and_size = bytes(crypto.SALT_BYTES) + (len(wrapped) - crypto.TAG_BYTES).to_bytes(8, "big")
    with pytest.raises(AuthenticationError):  # as a version-4 segment
        admit(b"FJE\x04\x03aws" + salt_and_size + wrapped + bytes(crypto.TRAILER_BYTES), coord)
    with pytest.raises(AuthenticationError):  # as a version-3 segment, where replay still reads one
        admit(b"FJE\x03\x03aws" + salt_and_size + wrapped, coord, legacy=True)
    legacy = msgpack.packb({"ev": 1, "from": "aws", "ct": wrapped}, use_bin_type=True)
    with pytest.raises(SchemaError):  # the raw-Box envelope is read only when replaying old stores
        admit(legacy, coord)
    update = crypto.seal_update(frame(), members["aws"])
    header = len(b"FJE\x04\x03aws") + crypto.SALT_BYTES + 8
    with pytest.raises(AuthenticationError):  # an update's ciphertext is no version key for aws
        crypto.open_version_key(update[header:], members["aws"])


def test_non_members_and_the_wrong_subject_are_refused_before_any_key_is_used(monkeypatch):
    coord, members = make_parties(CLOUDS, observers=("eval",))
    cases = [
        (crypto.seal_update(frame("eval"), members["eval"]), "eval"),  # an observer holds a key, not a vote
        (crypto.seal_update(frame("aws"), members["aws"]), "gcp"),  # aws's update moved to gcp's subject
        (b"FJE\x02\x0bcoordinator" + bytes(64), "coordinator"),
    ]
    used: list[str] = []
    original_to, original_updates = crypto.Boxes.to, crypto.Boxes.updates_with
    monkeypatch.setattr(crypto.Boxes, "to", lambda self, peer: used.append(peer) or original_to(self, peer))
    monkeypatch.setattr(
        crypto.Boxes, "updates_with", lambda self, peer: used.append(peer) or original_updates(self, peer)
    )
    for envelope, subject_cloud in cases:
        with pytest.raises(AuthenticationError):
            admit(envelope, coord, subject_cloud)
    assert used == []
    assert admit(crypto.seal_update(frame("aws"), members["aws"]), coord).update.header.cloud == "aws"


def test_old_envelopes_are_read_only_where_asked_for():
    """Version-1 envelopes (msgpack, raw Box) still replay from old stores with ``legacy``."""
    coord, members = make_parties(CLOUDS)
    ciphertext = Box(members["aws"].me.box, coord.me.box.public_key).encrypt(frame())
    old = msgpack.packb({"ev": 1, "from": "aws", "ct": bytes(ciphertext)}, use_bin_type=True)
    assert admit(old, coord, legacy=True).update.header.seq == 1
    with pytest.raises(SchemaError):
        admit(old, coord)
    assert COORDINATOR not in SPEC.clouds
