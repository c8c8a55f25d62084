"""Version-4 update envelopes: AES-GCM segments opened as the chunks arrive, then the sealed
signature (tests/test_update_signatures.py covers who can sign).

The classes of fault: a split anywhere must not matter; a changed, moved, dropped or added
byte anywhere must fail authentication or framing; nothing but the fixed header is read, and
no key is used, before the sender is known to be allowed; a declared size is not allocated
before a segment authenticates it; a reader never holds a big update's ciphertext beside its
plaintext; a re-read chunk of a lazily sealed envelope is the same bytes.
"""

from __future__ import annotations

import asyncio
import os
import tracemalloc

import pytest

from fedjet.broker.blobs import BlobAssembler, publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.updates import OpeningSink, UpdateInbox, UpdateSender
from fedjet.codecs import crypto
from fedjet.codecs.crypto import SEGMENT_BYTES, TAG_BYTES, TRAILER_BYTES, SealedUpdate, UpdateOpener
from fedjet.errors import AuthenticationError, CodecError, DecodeError, LimitError, SchemaError
from tests.conftest import make_parties

CLOUDS = ("aws", "gcp")
HEADER = len(b"FJE\x04\x03aws") + crypto.SALT_BYTES + 8


def opened(envelope: bytes, coord, step: int, senders=("aws",)) -> bytes:
    opener = UpdateOpener(coord, crypto.envelope_limit(len(envelope)), senders=senders)
    for at in range(0, len(envelope), step):
        opener.feed(envelope[at : at + step])
    sender, frame = opener.finish()
    assert sender == "aws"
    return bytes(frame)


@pytest.mark.parametrize("size", [0, 1, SEGMENT_BYTES - 1, SEGMENT_BYTES, SEGMENT_BYTES + 1, 3 * SEGMENT_BYTES + 17])
def test_any_split_of_any_size_opens_to_the_frame(size):
    coord, members = make_parties(CLOUDS)
    frame = os.urandom(size)
    envelope = crypto.seal_update(frame, members["aws"])
    assert (
        len(envelope)
        == crypto.sealed_size(size, "aws")
        == HEADER + size + TAG_BYTES * max(1, -(-size // SEGMENT_BYTES)) + TRAILER_BYTES
    )
    for step in (1, 7, 93, 4096, SEGMENT_BYTES + TAG_BYTES, len(envelope) + 1):
        if step < 4096 and size > SEGMENT_BYTES:
            continue  # byte-by-byte over megabytes proves nothing more and takes long
        assert opened(envelope, coord, step) == frame
    assert crypto.open_update(envelope, coord, len(envelope))[1] == frame


def test_a_lazily_sealed_envelope_reads_the_same_bytes_in_any_ranges_and_twice():
    _, members = make_parties(CLOUDS)
    frame = os.urandom(2 * SEGMENT_BYTES + 5)
    sealed = SealedUpdate(frame, members["aws"])
    whole = bytes(sealed.read(0, len(sealed)))
    for step in (1000, 333_333, SEGMENT_BYTES, len(sealed)):
        pieces = b"".join(sealed.read(at, at + step) for at in range(0, len(sealed), step))
        assert pieces == whole
    assert sealed.read(HEADER + 10, HEADER + 20) == whole[HEADER + 10 : HEADER + 20]
    again = SealedUpdate(frame, members["aws"])  # a new message: a new salt, a new key
    assert bytes(again.read(0, len(again)))[HEADER:] != whole[HEADER:]


def test_every_changed_moved_dropped_or_added_byte_is_refused():
    coord, members = make_parties(CLOUDS)
    frame = os.urandom(2 * SEGMENT_BYTES + 100)
    envelope = bytes(crypto.seal_update(frame, members["aws"]))
    stride = SEGMENT_BYTES + TAG_BYTES
    signature = len(envelope) - TRAILER_BYTES
    flips = [5 + 3, HEADER - 9, HEADER - 1, HEADER, HEADER + stride - 1, HEADER + stride + 5, signature - 1]
    flips += [signature, len(envelope) - 1]
    for at in flips:  # salt, size, first segment, a tag, the second and the last segment, the signature
        tampered = bytearray(envelope)
        tampered[at] ^= 1
        with pytest.raises(CodecError):
            opened(bytes(tampered), coord, 65536)
    first, second = envelope[HEADER : HEADER + stride], envelope[HEADER + stride : HEADER + 2 * stride]
    swapped = envelope[:HEADER] + second + first + envelope[HEADER + 2 * stride :]
    with pytest.raises(AuthenticationError):  # segments out of place: nonces are their indices
        opened(swapped, coord, 65536)
    with pytest.raises(DecodeError):  # the last segment dropped
        opened(envelope[: HEADER + 2 * stride], coord, 65536)
    with pytest.raises(DecodeError):  # a byte after the last segment
        opened(envelope + b"\x00", coord, 65536)
    other = bytes(crypto.seal_update(frame, members["aws"]))
    with pytest.raises(AuthenticationError):  # a segment of another message of the same sender
        opened(envelope[: HEADER + stride] + other[HEADER + stride :], coord, 65536)


def test_no_key_is_used_before_the_sender_is_known_to_be_allowed(monkeypatch):
    coord, members = make_parties(CLOUDS, observers=("eval",))
    cases = [
        (crypto.seal_update(b"frame", members["eval"]), AuthenticationError),  # a key, but no vote
        (crypto.seal_update(b"frame", members["gcp"]), AuthenticationError),  # gcp on aws's subject
        (b"FJE\x04\x0bcoordinator" + bytes(64), AuthenticationError),
        (b"FJE\x09\x03aws" + bytes(64), SchemaError),
        (b"FJE\x03\x03aws" + bytes(64), SchemaError),  # unsigned: only replay reads version 3
        (b"FJX\x04\x03aws" + bytes(64), DecodeError),
        (b"FJE\x04\x03a s" + bytes(64), DecodeError),
    ]
    used: list[str] = []
    original = crypto.Boxes.updates_with
    monkeypatch.setattr(crypto.Boxes, "updates_with", lambda self, peer: used.append(peer) or original(self, peer))
    for envelope, error in cases:
        opener = UpdateOpener(coord, 1 << 20, senders={"aws"})
        with pytest.raises(error):
            opener.feed(envelope)
    assert used == []


def test_a_declared_size_is_neither_allocated_before_it_authenticates_nor_beyond_the_limit():
    coord, members = make_parties(CLOUDS)
    envelope = bytes(crypto.seal_update(b"x" * 1000, members["aws"]))
    huge = bytearray(envelope)
    huge[HEADER - 8 : HEADER] = (1 << 40).to_bytes(8, "big")  # a terabyte, on a 1 MiB limit
    with pytest.raises(LimitError):
        UpdateOpener(coord, 1 << 20, senders={"aws"}).feed(bytes(huge))
    lied = bytearray(envelope[:HEADER])
    lied[HEADER - 8 : HEADER] = (60_000_000).to_bytes(8, "big")  # within a 64 MiB limit, but forged
    fed = bytes(lied) + bytes(SEGMENT_BYTES + TAG_BYTES)
    tracemalloc.start()
    try:
        with pytest.raises(AuthenticationError):
            UpdateOpener(coord, 64 << 20, senders={"aws"}).feed(fed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * SEGMENT_BYTES  # one segment's worth, never the 60 MB it declared
    with pytest.raises(LimitError):  # fed beyond the limit, whatever the header says
        UpdateOpener(coord, 500, senders={"aws"}).feed(envelope)


def test_the_assembler_feeds_a_sink_in_order_keeps_only_early_chunks_and_reports_a_failure():
    coord, members = make_parties(CLOUDS)
    frame = os.urandom(5 * SEGMENT_BYTES)
    envelope = bytes(crypto.seal_update(frame, members["aws"]))
    count, step = 6, -(-len(envelope) // 6)
    parts = [envelope[i * step : (i + 1) * step] for i in range(count)]

    def headers(i: int) -> dict[str, str]:
        return {"Fedjet-Blob": "b", "Fedjet-Part": f"{i}/{count}", "Fedjet-Size": str(len(envelope))}

    def assembler() -> BlobAssembler:
        return BlobAssembler(
            max_blob_bytes=len(envelope), max_pending_bytes=2 * len(envelope), min_chunk_bytes=1,
            sink=lambda subject, blob: OpeningSink(UpdateOpener(coord, len(envelope), senders={"aws"})),
        )  # fmt: skip

    asm = assembler()
    order = [1, 0, 3, 2, 5, 4]
    for n, i in enumerate(order[:-1]):
        assert asm.add("s", headers(i), parts[i], seq=n + 1) is None
        held = asm._pending["s", "b"]
        assert set(held.parts) == {j for j in order[: n + 1] if j >= held.fed}  # only what cannot be fed yet
    blob = asm.add("s", headers(4), parts[4], seq=6)
    assert blob is not None and blob.error is None and bytes(blob.data) == frame and len(blob.seqs) == count

    asm = assembler()
    bad = bytearray(parts[2])
    bad[100] ^= 1
    results = [asm.add("s", headers(i), bytes(bad) if i == 2 else parts[i], seq=i + 1) for i in range(count)]
    assert results[:-1] == [None] * (count - 1)
    failed = results[-1]
    assert failed is not None and isinstance(failed.error, AuthenticationError) and failed.seqs == list(range(1, 7))


def test_the_inbox_opens_updates_as_they_arrive_and_refuses_a_forged_chunk_with_every_message(nats_url):
    coord, members = make_parties(CLOUDS)
    subjects = JobSubjects("stream3")
    frame = os.urandom(3 * SEGMENT_BYTES + 11)

    async def scenario():
        nc = await connect(nats_url, "t")
        js = nc.jetstream()
        try:
            await ensure_job_streams(js, subjects)
            limit = crypto.envelope_limit(len(frame))
            inbox = UpdateInbox(js, subjects, max_blob_bytes=limit, clouds=CLOUDS, max_payload=1 << 20, boxes=coord)
            await inbox.open(1)
            sent = await UpdateSender(js, subjects, members["aws"], "aws", "0", max_payload=nc.max_payload).send(
                frame, 1
            )
            forged = bytearray(crypto.seal_update(frame, members["gcp"]))
            forged[-1] ^= 1
            await publish_blob(js, subjects.update("gcp"), bytes(forged), blob_id="gcp-forged", max_payload=1 << 20)
            arrivals, messages = [], 0
            while len(arrivals) < 2:
                for msg in await inbox.fetch(timeout=2.0):
                    messages += 1
                    arrival = await inbox.receive(msg)
                    if arrival is not None:
                        arrivals.append(arrival)
                        await inbox.ack(arrival.msgs)
            await inbox.close()
            return sent, arrivals, messages
        finally:
            await close_quietly(nc)

    sent, (good, bad), messages = asyncio.run(scenario())
    assert good.cloud == "aws" and good.error is None and bytes(good.blob.data) == frame
    assert len(good.msgs) == sent.chunks > 1
    assert all(m.data == b"" for m in good.msgs)  # held for the ack, not for their bytes
    assert bad.cloud == "gcp" and bad.blob is None and isinstance(bad.error, AuthenticationError)
    assert len(good.msgs) + len(bad.msgs) == messages
