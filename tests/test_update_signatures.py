"""Who sent an update: version-4 envelopes carry the sender's Ed25519 signature.

The attacker here holds the coordinator's secret key, and so every pair key derivable from it:
it can seal an envelope that decrypts as "from" any cloud. What it cannot make is that
cloud's signature, and both the live coordinator and ``fedjet replay --verify`` check it with
the cloud's ``.pub``. Also: a signature cannot be stripped, moved or taken from a secure-
aggregation message; unsigned version-3 envelopes are read only by replay; signing keeps one
pass over the frame and no second copy of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import tracemalloc

import pytest
import torch
from nacl.signing import SigningKey

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs import crypto
from fedjet.codecs.crypto import (
    COORDINATOR,
    SEGMENT_BYTES,
    TRAILER_BYTES,
    Boxes,
    Identity,
    PublicIdentity,
    ReplayGuard,
    SealedUpdate,
    UpdateOpener,
)
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, UpdateHeader, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.config.job import JobConfig, StopConfig, TrainConfig
from fedjet.coordinator.admission import Admission
from fedjet.coordinator.service import Coordinator, CoordinatorConfig
from fedjet.errors import AuthenticationError, SchemaError
from fedjet.keystore import generate, load_identity, load_public, write_public
from fedjet.runner.replay import ReplayConfig, verify_recording
from fedjet.secagg import wire
from fedjet.spec import JobSpec
from tests.conftest import WEIGHTS, make_parties

CLOUDS = ("aws", "gcp")
CODEC = "topk:0.01+int8"
LIMITS = Limits.for_model(1020, 2)


def frame(cloud: str = "aws", seq: int = 1, job: str = "sig") -> bytes:
    header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=seq, base_version=0, samples=8, loss=2.0)
    tensors = {n: torch.full(t.shape, 0.01) for n, t in WEIGHTS.items()}
    return encode_update(Update(header, tensors), CodecSpec.parse(CODEC))


def forger(coordinator: Boxes, victim: str, signing: SigningKey | None = None) -> Boxes:
    """What the coordinator's key buys: Box(coordinator_sk, victim_pk) is the victim's pair key,
    so boxes named after the victim seal envelopes that decrypt as the victim's. The signing key
    is the coordinator's own unless another is given: the victim's is nowhere to be had."""
    victim_public = coordinator.public_of(victim)
    me = Identity(victim, coordinator.me.box, signing or coordinator.me.sign)
    return Boxes(me, {COORDINATOR: PublicIdentity(COORDINATOR, victim_public.box, victim_public.verify)})


def forge(data: bytes, coordinator: Boxes, victim: str, signing: SigningKey | None = None) -> bytes:
    sealed = SealedUpdate(data, forger(coordinator, victim, signing))
    sealed._recipient = coordinator.me.box.public_key  # signed as sealed to the real coordinator
    return bytes(sealed.read(0, len(sealed)))


def seal_version_3(data: bytes, boxes: Boxes) -> bytes:
    """An unsigned envelope as the previous build sealed it (what recorded stores hold)."""
    sender, salt = boxes.me.name.encode(), os.urandom(crypto.SALT_BYTES)
    header = b"FJE\x03" + bytes((len(sender),)) + sender + salt + len(data).to_bytes(8, "big")
    cipher = crypto._message_cipher(boxes.update_key_with(COORDINATOR), salt)
    count = max(1, -(-len(data) // SEGMENT_BYTES))
    segments = [cipher.encrypt(crypto._nonce(i), data[i * SEGMENT_BYTES : (i + 1) * SEGMENT_BYTES], header)
                for i in range(count)]  # fmt: skip
    return header + b"".join(segments)


def spec(job: str, rounds: int = 1) -> JobSpec:
    config = JobConfig(job=job, clouds=CLOUDS, observers=(), codec=CODEC, train=TrainConfig(local_steps=1),
                       stop=StopConfig(rounds=rounds))  # fmt: skip
    return JobSpec(config=config, model_config={})


def test_a_coordinator_key_holder_cannot_seal_an_update_from_a_cloud():
    coord, members = make_parties(CLOUDS)
    genuine = crypto.seal_update(frame(), members["aws"])
    assert crypto.open_update(genuine, coord, 1 << 20)[1] == frame()
    for signing in (None, SigningKey.generate()):  # the coordinator's own signing key, or any other
        forged = forge(frame(), coord, "aws", signing)
        opener = UpdateOpener(coord, 1 << 20, senders={"aws"})
        opener.feed(forged)  # every segment authenticates: the pair key is the coordinator's too
        assert opener.sender == "aws" and opener._segment == opener._pieces
        with pytest.raises(AuthenticationError, match="not signed by aws's key"):
            opener.finish()
        for legacy in (False, True):  # live, and as replay reads it
            with pytest.raises(AuthenticationError, match="not signed"):
                Admission(spec("sig"), coord, LIMITS, legacy_envelopes=legacy).admit(
                    forged, "aws", WEIGHTS, lambda base: 0, ReplayGuard()
                )


def test_a_signature_cannot_be_stripped_replaced_or_moved():
    coord, members = make_parties(CLOUDS)
    data = os.urandom(SEGMENT_BYTES + 10)
    envelope = crypto.seal_update(data, members["aws"])
    with pytest.raises(AuthenticationError, match="without its signature"):
        crypto.open_update(envelope[:-TRAILER_BYTES], coord, len(envelope))
    with pytest.raises(AuthenticationError, match="without its signature"):
        crypto.open_update(envelope[:-1], coord, len(envelope))
    other = crypto.seal_update(data, members["aws"])  # the same frame, another message (salt, key)
    with pytest.raises(AuthenticationError):
        crypto.open_update(envelope[:-TRAILER_BYTES] + other[-TRAILER_BYTES:], coord, len(envelope))
    relabelled = bytearray(envelope)
    relabelled[3] = 3  # claimed to be an unsigned version-3 envelope, where replay reads those
    with pytest.raises(AuthenticationError):  # the header is every segment's associated data
        crypto.open_update(bytes(relabelled[:-TRAILER_BYTES]), coord, len(envelope), legacy=True)


def test_unsigned_version_3_is_read_only_by_replay_and_version_4_is_checked_there_too():
    coord, members = make_parties(CLOUDS)
    old = seal_version_3(frame(), members["aws"])
    with pytest.raises(SchemaError):
        crypto.open_update(old, coord, 1 << 20)
    with pytest.raises(SchemaError):  # nor by the coordinator's inbox
        UpdateOpener(coord, 1 << 20, senders={"aws"}).feed(old)
    assert crypto.open_update(old, coord, 1 << 20, legacy=True) == ("aws", frame())
    forged_old = seal_version_3(frame(), forger(coord, "aws"))  # why old records prove nothing of the sender
    assert crypto.open_update(forged_old, coord, 1 << 20, legacy=True) == ("aws", frame())


def test_the_signed_message_is_bound_and_domain_separated():
    coord, members = make_parties(CLOUDS)
    header, digest = b"FJE\x04\x03aws" + bytes(24), hashlib.sha256(b"f").digest()
    message = crypto.update_signed_message(header, coord.me.box.public_key, digest)
    other_coordinator = Identity.generate(COORDINATOR).box.public_key
    assert message != crypto.update_signed_message(header, other_coordinator, digest)  # bound to the recipient
    assert message.startswith(b"fedjet-update-signature-v4\x00")
    body = wire.canonical("advert", "sig", 1, "aws", b"c", b"s", b"b")
    assert body[0] in range(0x90, 0xA0) and message[0] not in range(0x90, 0xA0) and message[0] not in (0xDC, 0xDD)
    signature = wire.sign(body, members["aws"].me.sign)  # a genuine secure-aggregation signature by aws
    stolen = forge(frame(), coord, "aws")[:-TRAILER_BYTES]
    sealed = crypto._message_cipher(coord.update_key_with("aws"), stolen[8:24])
    trailer = sealed.encrypt(crypto._nonce(1), signature, stolen[:32])  # sealed where the signature goes
    with pytest.raises(AuthenticationError, match="not signed"):
        crypto.open_update(stolen + trailer, coord, 1 << 20)


def test_the_stream_digest_keeps_the_order_of_big_and_small_pieces():
    data = os.urandom(3 * SEGMENT_BYTES)
    cuts = [0, 10, crypto.StreamDigest.THREAD_MIN + 5, SEGMENT_BYTES, SEGMENT_BYTES + 7, 2 * SEGMENT_BYTES, len(data)]
    digest = crypto.StreamDigest()
    view = memoryview(data)
    for lo, hi in itertools.pairwise(cuts):  # big pieces go to the thread, small ones not
        digest.update(view[lo:hi])
    assert digest.digest() == hashlib.sha256(data).digest()


def opening_peak(envelope: bytes, coord: Boxes, *, legacy: bool = False) -> int:
    """Bytes allocated at most while opening ``envelope`` in publisher-sized pieces."""
    step = SEGMENT_BYTES // 2 + 1000
    pieces = [envelope[at : at + step] for at in range(0, len(envelope), step)]
    tracemalloc.start()
    try:
        opener = UpdateOpener(coord, len(envelope), senders={"aws"}, legacy=legacy)
        for piece in pieces:
            opener.feed(piece)
        opener.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_signing_takes_no_second_copy_of_the_frame_at_either_end():
    coord, members = make_parties(CLOUDS)
    data = os.urandom(8 * SEGMENT_BYTES)
    sealed = SealedUpdate(data, members["aws"])
    step = SEGMENT_BYTES // 2 + 1000
    tracemalloc.start()
    try:
        pieces = [bytes(sealed.read(at, at + step)) for at in range(0, len(sealed), step)]
        _, seal_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seal_peak < len(sealed) + 3 * SEGMENT_BYTES, seal_peak  # the pieces kept, a segment or two besides
    signed = opening_peak(b"".join(pieces), coord)
    unsigned = opening_peak(seal_version_3(data, members["aws"]), coord, legacy=True)
    assert signed < unsigned + (64 << 10), (signed, unsigned)  # the digest costs no memory to speak of
    assert signed < len(data) + 4 * SEGMENT_BYTES, signed  # the plaintext, and a few segments in flight


async def _run(coordinator: Coordinator, nats_url: str, publish: list[tuple[str, bytes]]):
    subjects = JobSubjects(coordinator.config.spec.job)
    nc = await connect(nats_url, "clouds")
    js = nc.jetstream()
    try:
        task = asyncio.create_task(coordinator.run(dict(WEIGHTS)))
        await asyncio.wait_for(coordinator.serving.wait(), 30)
        for n, (cloud, envelope) in enumerate(publish):
            await publish_blob(js, subjects.update(cloud), envelope, blob_id=f"{cloud}-{n}", max_payload=nc.max_payload)
        try:
            return await asyncio.wait_for(task, 60)
        except TimeoutError:
            raise AssertionError("the coordinator did not finish its round within 60 s") from None
    finally:
        await close_quietly(nc)


def test_the_live_coordinator_refuses_an_update_forged_with_its_own_key(nats_url):
    """The forgery comes first and with a higher sequence number: accepted, it would also have
    spent aws's sequence numbers and made aws's genuine update a replay."""
    coord, members = make_parties(CLOUDS)
    coordinator = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec("sig"), boxes=coord, idle_timeout_s=30))
    forged = forge(frame("aws", 9), coord, "aws")
    genuine = [(c, crypto.seal_update(frame(c, 5 + n), members[c])) for n, c in enumerate(CLOUDS)]
    ledger = asyncio.run(_run(coordinator, nats_url, [("aws", forged), *genuine]))
    assert ledger.rejected == {"AuthenticationError": 1}
    assert ledger.applied == 2 and ledger.guard == {"aws/0": 5, "gcp/0": 6}  # aws's own update went in


def test_replay_verify_rechecks_every_signature_with_the_senders_public_key(nats_url, tmp_path):
    """A coordinator that swapped aws's .pub for its own key records a forged update as aws's;
    replay with aws's real .pub finds it, and replay with the swapped one (the control) does not."""
    honest, swapped = tmp_path / "honest", tmp_path / "swapped"
    generate(honest, CLOUDS)
    swapped.mkdir()
    (swapped / "coordinator.key").write_bytes((honest / "coordinator.key").read_bytes())
    (swapped / "coordinator.key").chmod(0o600)
    write_public(swapped, load_public(honest, "gcp"))
    fake = SigningKey.generate()
    write_public(swapped, PublicIdentity("aws", load_public(honest, "aws").box, fake.verify_key))
    lying = Boxes(load_identity(swapped, COORDINATOR), {c: load_public(swapped, c) for c in CLOUDS})
    gcp = Boxes(load_identity(honest, "gcp"), {COORDINATOR: load_public(honest, COORDINATOR)})
    job = "sigreplay"
    coordinator = Coordinator(CoordinatorConfig(nats_url=nats_url, spec=spec(job), boxes=lying, idle_timeout_s=30))
    publish = [
        ("aws", forge(frame("aws", 1, job), lying, "aws", fake)),
        ("gcp", crypto.seal_update(frame("gcp", 2, job), gcp)),
    ]
    ledger = asyncio.run(_run(coordinator, nats_url, publish))
    assert ledger.applied == 2 and ledger.rejected == {}  # the lying coordinator took it
    results = {}
    for keys in (honest, swapped):
        config = ReplayConfig(nats_url=nats_url, job=job, keys=str(keys), verify=True, progress=False)
        results[keys] = verify_recording(config).to_dict()
    assert results[swapped] == {"versions": 1, "mismatches": 0, "first_mismatch": None}
    found = results[honest]
    assert found["versions"] == 1 and found["mismatches"] == 1, found
    assert "AuthenticationError" in str(found["first_mismatch"]) and "not signed by aws" in str(found["first_mismatch"])
