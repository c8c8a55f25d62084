"""No trust in the broker: sealed updates, signed globals, anti-replay, hostile input.

Every malformed input must end in a typed ``CodecError`` (never another exception), whatever
the broker operator does to the bytes.
"""

from __future__ import annotations

import os
import random
import stat

import msgpack
import pytest
import torch

from fedjet.codecs import crypto
from fedjet.codecs.crypto import COORDINATOR, Boxes, Identity, ReplayGuard
from fedjet.codecs.frame import Limits, pack_frame
from fedjet.codecs.messages import (
    GlobalHead,
    GlobalHeader,
    GlobalVersion,
    Update,
    UpdateHeader,
    decode_global,
    encode_global,
    encode_update,
    open_sealed_update,
)
from fedjet.codecs.pipeline import CodecSpec
from fedjet.codecs.record import VersionRecord
from fedjet.config.job import JobConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.strategies import Aggregator
from fedjet.errors import (
    AuthenticationError,
    CodecError,
    FedjetError,
    LimitError,
    ReplayError,
    ValidationError,
)
from fedjet.keystore import coordinator_boxes, generate, member_boxes
from fedjet.spec import JobSpec

CLOUDS = ("aws", "gcp", "azure")
LIMITS = Limits(max_frame_bytes=1 << 24)


@pytest.fixture(scope="module")
def parties():
    ids = {name: Identity.generate(name) for name in (COORDINATOR, *CLOUDS)}
    coord = Boxes(ids[COORDINATOR], {c: ids[c].public for c in CLOUDS})
    members = {c: Boxes(ids[c], {COORDINATOR: ids[COORDINATOR].public}) for c in CLOUDS}
    return coord, members


WEIGHTS = {"w": torch.zeros(40, 10), "b": torch.zeros(10)}
SPEC = JobSpec(config=JobConfig(job="j", clouds=CLOUDS, codec="topk:0.1+int8"), model_config={})


def update_frame(cloud="aws", seq=1, codec="topk:0.1+int8", tensors=None) -> bytes:
    header = UpdateHeader(job="j", cloud=cloud, worker="0", seq=seq, base_version=0, samples=4, loss=2.0)
    gen = torch.Generator().manual_seed(seq)
    tensors = tensors or {n: torch.randn(t.shape, generator=gen) for n, t in WEIGHTS.items()}
    return encode_update(Update(header, tensors), CodecSpec.parse(codec))


def accept(envelope: bytes, coord: Boxes, subject_cloud: str = "aws", guard: ReplayGuard | None = None):
    """The coordinator's whole acceptance path for bytes from an update subject (the very
    admission the live service and replay call)."""
    aggregator = Aggregator(SPEC.strategy, dict(WEIGHTS))
    admission = Admission(SPEC, coord, LIMITS)
    return admission.admit(envelope, subject_cloud, WEIGHTS, aggregator.admissible, guard or ReplayGuard()).contribution


def test_sealed_update_round_trips_and_names_its_sender(parties):
    coord, members = parties
    contribution = accept(crypto.seal_update(update_frame(), members["aws"]), coord)
    assert contribution.cloud == "aws" and set(contribution.tensors) == {"w", "b"}


def test_broker_cannot_read_an_update(parties):
    _, members = parties
    frame = update_frame(codec="dense")
    envelope = crypto.seal_update(frame, members["aws"])
    assert frame[40:80] not in envelope and b'"job"' not in envelope and b"base_version" not in envelope


def test_wrong_key_swapped_cloud_and_forged_sender_are_authentication_errors(parties):
    coord, members = parties
    outsider = Boxes(Identity.generate("aws"), {COORDINATOR: coord.me.public})  # claims aws, wrong key
    with pytest.raises(AuthenticationError):
        accept(crypto.seal_update(update_frame(), outsider), coord)
    with pytest.raises(AuthenticationError):  # aws's message moved onto gcp's subject
        accept(crypto.seal_update(update_frame(), members["aws"]), coord, subject_cloud="gcp")
    with pytest.raises(AuthenticationError):  # sealed by gcp but the frame says aws
        accept(crypto.seal_update(update_frame(cloud="aws"), members["gcp"]), coord, subject_cloud="gcp")
    unknown = Boxes(Identity.generate("ibm"), {COORDINATOR: coord.me.public})
    with pytest.raises(AuthenticationError):
        accept(crypto.seal_update(update_frame(), unknown), coord, subject_cloud="ibm")


def test_replayed_or_old_sequence_numbers_are_rejected(parties):
    coord, members = parties
    guard = ReplayGuard()
    accept(crypto.seal_update(update_frame(seq=10), members["aws"]), coord, guard=guard)
    with pytest.raises(ReplayError):
        accept(crypto.seal_update(update_frame(seq=10), members["aws"]), coord, guard=guard)
    with pytest.raises(ReplayError):
        accept(crypto.seal_update(update_frame(seq=9), members["aws"]), coord, guard=guard)
    accept(crypto.seal_update(update_frame(seq=11), members["aws"]), coord, guard=guard)


def test_nan_and_wrong_shape_updates_are_validation_errors(parties):
    coord, members = parties
    nan = {"w": torch.full((40, 10), float("nan")), "b": torch.zeros(10)}
    with pytest.raises(ValidationError, match="NaN"):
        accept(crypto.seal_update(update_frame(codec="dense", tensors=nan), members["aws"]), coord)
    wrong = {"w": torch.zeros(10, 40), "b": torch.zeros(10)}
    with pytest.raises(ValidationError, match="shape"):
        accept(crypto.seal_update(update_frame(codec="dense", tensors=wrong), members["aws"]), coord)


def _sealed_version(payload, record: bytes, coord, seal: int) -> tuple[bytes, dict[str, bytes], bytes]:
    """Ciphertext, member keys and sealed record of a version under ``seal``: the streamed seal
    the coordinator publishes, or the one box that runs recorded before it hold."""
    if seal == crypto.STREAMED:
        sealed = crypto.seal_global_streamed(payload, record, coord, list(CLOUDS))
        return bytes(sealed.payload.read(0, len(sealed.payload))), sealed.keys, sealed.meta
    old = crypto.seal_global(bytes(payload), record, coord, list(CLOUDS))
    return bytes(old.ciphertext), old.keys, old.meta


@pytest.mark.parametrize("seal", [crypto.STREAMED, crypto.ONE_BOX])
def test_signed_encrypted_global_verifies_and_tampering_is_detected(parties, seal):
    coord, members = parties
    version = GlobalVersion(GlobalHeader(job="j", version=3, hash="h"), dict(WEIGHTS))
    payload, header = encode_global(version)
    record = VersionRecord(strategy="fedavg", rejected_total=3)
    ciphertext, keys, meta = _sealed_version(payload, record.to_bytes(), coord, seal)
    head = GlobalHead(
        header=header,
        first_seq=1,
        last_seq=2,
        size=len(ciphertext),
        sha256=crypto.digest(ciphertext),
        keys=keys,
        meta=meta,
        seal=seal,
    )
    signed = head.sign(coord.me)
    assert GlobalHead.verify(signed, coord.me.public) == head
    opened = crypto.open_global(ciphertext, head.keys["gcp"], members["gcp"], head.seal)
    assert decode_global(opened, LIMITS).header.version == 3
    key = crypto.open_version_key(head.keys["gcp"], members["gcp"])
    assert VersionRecord.from_bytes(crypto.open_secret(head.meta, key)) == record
    assert b"rejected_total" not in signed  # the record travels encrypted
    forged = bytearray(signed)
    forged[-5] ^= 1
    with pytest.raises(AuthenticationError):
        GlobalHead.verify(bytes(forged), coord.me.public)
    with pytest.raises(AuthenticationError):  # the broker re-signs with its own key
        GlobalHead.verify(head.sign(Identity.generate(COORDINATOR)), coord.me.public)
    tampered = bytearray(ciphertext)
    tampered[100] ^= 1
    with pytest.raises(AuthenticationError):
        crypto.open_global(bytes(tampered), head.keys["gcp"], members["gcp"], head.seal)
    with pytest.raises(AuthenticationError):  # a key sealed to aws does not open for gcp
        crypto.open_global(ciphertext, head.keys["aws"], members["gcp"], head.seal)
    other = crypto.ONE_BOX if seal == crypto.STREAMED else crypto.STREAMED
    with pytest.raises(AuthenticationError):  # a head lying about the seal opens nothing
        crypto.open_global(ciphertext, head.keys["gcp"], members["gcp"], other)
    with pytest.raises(AuthenticationError):  # nor one naming a seal this build does not know
        crypto.open_global(ciphertext, head.keys["gcp"], members["gcp"], 7)


def _mutations(valid: bytes, rng: random.Random):
    for _ in range(400):  # bit flips
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if bytes(data) != valid:  # flips can cancel out
            yield bytes(data)
    for _ in range(200):  # truncation and extension
        yield valid[: rng.randrange(len(valid))]
        yield valid + os.urandom(rng.randint(1, 64))


def test_thousands_of_hostile_envelopes_all_end_in_typed_errors(parties):
    coord, members = parties
    rng = random.Random(0)
    valid = crypto.seal_update(update_frame(), members["aws"])
    inputs = [os.urandom(rng.randint(0, 4096)) for _ in range(2000)]
    inputs += [msgpack.packb(x) for x in ([], {}, {"ev": 1}, {"ev": 1, "from": "aws", "ct": 5}, "x" * 99)]
    inputs += list(_mutations(valid, rng))
    outcomes: dict[str, int] = {}
    for data in inputs:
        with pytest.raises(CodecError) as caught:
            accept(data, coord)
        outcomes[type(caught.value).__name__] = outcomes.get(type(caught.value).__name__, 0) + 1
    assert sum(outcomes.values()) == len(inputs) >= 2500
    assert outcomes.get("AuthenticationError", 0) > 100 and outcomes.get("DecodeError", 0) > 100


def _header_edits(frame: bytes, rng: random.Random):
    body = msgpack.unpackb(frame)
    edits = [
        ("fv", 2),
        ("type", "global"),
        ("header", []),
        ("tensors", {}),
    ]
    for key, value in edits:
        yield msgpack.packb(body | {key: value})
    header_edits = [
        ("seq", -1),
        ("seq", "1"),
        ("samples", None),
        ("loss", float("inf")),
        ("base_version", 2**64 - 1),
        ("kind", "poison"),
        ("job", 7),
        ("cloud", "gcp"),
    ]
    for key, value in header_edits:
        yield msgpack.packb(body | {"header": body["header"] | {key: value}})
    entry_edits = [
        ("s", [1 << 40, 1 << 40]),
        ("s", [-1]),
        ("s", "big"),
        ("s", [1] * 20),
        ("k", 10**12),
        ("k", -3),
        ("d", "float64"),
        ("e", "zstd"),
        ("q", "int3"),
        ("qc", 0),
        ("qc", 1 << 40),
        ("ix", "rle"),
        ("i", b"\xff" * 9),
        ("v", b""),
        ("sc", b"\x00\x00\xc0\x7f" * 2),
        ("n", ""),
        ("n", 5),
    ]
    for key, value in entry_edits:
        entries = [dict(e) for e in body["tensors"]]
        entries[rng.randrange(len(entries))][key] = value
        yield msgpack.packb(body | {"tensors": entries})
    yield msgpack.packb(body | {"tensors": body["tensors"] * 2})  # duplicate names
    yield msgpack.packb(body | {"tensors": [body["tensors"][0]] * 5000})  # too many entries


def test_edited_frames_sealed_with_a_valid_key_are_still_rejected(parties):
    """The broker cannot forge these; a buggy or compromised worker could. Both must be safe."""
    coord, members = parties
    rng = random.Random(1)
    count = 0
    for frame in _header_edits(update_frame(), rng):
        with pytest.raises(FedjetError):  # a CodecError, or StaleUpdateError for a future base
            accept(crypto.seal_update(frame, members["aws"]), coord)
        count += 1
    assert count >= 30


def test_declared_terabytes_are_refused_before_allocation(parties):
    coord, members = parties
    header = vars(UpdateHeader(job="j", cloud="aws", worker="0", seq=5, base_version=0, samples=1, loss=1.0))
    entry = {
        "n": "w",
        "s": [1 << 20, 1 << 20],
        "d": "float32",
        "k": 1 << 40,
        "e": "sparse",
        "q": "raw",
        "ix": "bitmap",
        "i": b"",
        "v": b"",
    }
    with pytest.raises(LimitError):
        accept(crypto.seal_update(pack_frame("update", header, [entry]), members["aws"]), coord)
    with pytest.raises(LimitError):
        open_sealed_update(b"\x00" * (crypto.envelope_limit(LIMITS.max_frame_bytes) + 1), coord, "aws", LIMITS)


def test_key_files_are_private_and_load_back(tmp_path):
    paths = generate(tmp_path / "keys", ["aws", "eval"])
    secret = tmp_path / "keys" / "aws.key"
    assert secret in paths and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "aws.pub").is_file()
    coord = coordinator_boxes(tmp_path / "keys", ["aws", "eval"])
    aws = member_boxes(tmp_path / "keys", "aws")
    envelope = crypto.seal_update(update_frame(), aws)
    assert open_sealed_update(envelope, coord, "aws", LIMITS).header.cloud == "aws"
    with pytest.raises(Exception, match="not overwriting"):
        generate(tmp_path / "keys", ["aws"])
