"""The broker layer against a real nats-server: chunked blobs, ordered reads, the server itself."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc

import pytest
import torch

from fedjet.broker.blobs import BlobAssembler, publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams, read_range
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, UpdateHeader, decode_update, encode_update
from fedjet.codecs.pipeline import CodecSpec
from fedjet.errors import BlobError, BrokerError, ConfigError
from fedjet.models.build import initial_model, parameter_tensors


def test_embedded_server_starts_on_loopback_and_stops(tmp_path):
    server = EmbeddedNatsServer(tmp_path / "store")
    url = server.start()
    host, port = url.removeprefix("nats://").split(":")
    assert host == "127.0.0.1"
    socket.create_connection((host, int(port)), timeout=2).close()
    server.stop()
    server.stop()  # twice is fine
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1)
    assert (tmp_path / "store" / "jetstream").is_dir()  # the kept store survives


def test_model_update_larger_than_8mb_crosses_the_broker_intact(nats_url):
    """A real GPT-2 update of ~13 MB, chunked under the 1 MB max_payload, read back bit for bit."""
    model = initial_model("small", vocab_size=257, eos_id=256, seed=1)
    before = parameter_tensors(model)
    gen = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(t.shape, generator=gen) * 1e-3 for n, t in before.items()}
    header = UpdateHeader(job="big", cloud="aws", worker="0", seq=1, base_version=0, samples=8, loss=3.0)
    payload = encode_update(Update(header, delta), CodecSpec.dense())
    assert len(payload) > 8 * 1024 * 1024

    async def scenario():
        subjects = JobSubjects("big")
        nc = await connect(nats_url, "test")
        js = nc.jetstream()
        await ensure_job_streams(js, subjects)
        published = await publish_blob(
            js, subjects.update("aws"), payload, blob_id="aws/0/1", max_payload=nc.max_payload
        )
        assert published.chunks == -(-len(payload) // (nc.max_payload - 2048))
        assembler = BlobAssembler(max_blob_bytes=1 << 26, max_pending_bytes=1 << 27)
        blobs = []
        async for msg in read_range(js, subjects.update_stream, subjects.updates):
            blob = assembler.add(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream)
            if blob:
                blobs.append(blob)
        await close_quietly(nc)
        return published, blobs

    published, blobs = asyncio.run(scenario())
    assert published.chunks > 8
    assert len(blobs) == 1 and blobs[0].last_seq == published.last_seq
    back = decode_update(blobs[0].data, Limits())
    assert all(torch.equal(back.tensors[n], delta[n]) for n in delta)


def test_republished_blob_is_deduplicated_by_jetstream(nats_url):
    async def scenario():
        subjects = JobSubjects("dedup")
        nc = await connect(nats_url, "test")
        js = nc.jetstream()
        await ensure_job_streams(js, subjects)
        first = await publish_blob(js, subjects.update("gcp"), b"x" * 3000, blob_id="b1", max_payload=4096 + 2048)
        again = await publish_blob(js, subjects.update("gcp"), b"x" * 3000, blob_id="b1", max_payload=4096 + 2048)
        info = await js.stream_info(subjects.update_stream)
        await close_quietly(nc)
        return first, again, info.state.messages

    first, again, stored = asyncio.run(scenario())
    assert not first.duplicate and again.duplicate
    assert stored == first.chunks


def chunk(blob: str, i: int, n: int, size: int) -> dict[str, str]:
    return {"Fedjet-Blob": blob, "Fedjet-Part": f"{i}/{n}", "Fedjet-Size": str(size)}


def assembler(**overrides) -> BlobAssembler:
    """Tiny budgets for hand-made chunks (real ones are at least 2 KiB each)."""
    return BlobAssembler(**({"max_blob_bytes": 100, "max_pending_bytes": 200, "min_chunk_bytes": 1} | overrides))


def test_assembler_reassembles_interleaved_blobs_and_refuses_a_repeated_part_alone():
    asm = assembler()
    assert asm.add("s", chunk("a", 0, 2, 4), b"ab", 1) is None
    assert asm.add("s", chunk("b", 0, 1, 3), b"xyz", 2).data == b"xyz"
    with pytest.raises(BlobError, match="twice"):  # refused at once, never held
        asm.add("s", chunk("a", 0, 2, 4), b"zz", 3)
    done = asm.add("s", chunk("a", 1, 2, 4), b"cd", 4)
    assert done.data == b"abcd" and done.seqs == [1, 4]  # the first copy counts, the blob survives


@pytest.mark.parametrize(
    "headers, data",
    [
        (None, b"x"),
        ({"Fedjet-Blob": "a", "Fedjet-Part": "zero/1", "Fedjet-Size": "1"}, b"x"),
        (chunk("a", 2, 2, 4), b"ab"),  # index beyond count
        (chunk("a", 0, 1, 10**15), b"x"),  # declared petabyte
        (chunk("a", 0, 2, 4), b"abc"),  # wrong chunk length
    ],
)
def test_assembler_rejects_bad_chunks_with_blob_error(headers, data):
    with pytest.raises(BlobError):
        assembler(max_blob_bytes=1 << 20, max_pending_bytes=1 << 21).add("s", headers, data, 1)


def test_blobs_on_different_subjects_never_mix_even_with_the_same_id():
    asm = assembler()
    assert asm.add("fedjet.j.update.aws", chunk("x", 0, 2, 4), b"ab", 1) is None
    with pytest.raises(BlobError):  # gcp's garbage under aws's id hurts only itself
        asm.add("fedjet.j.update.gcp", chunk("x", 0, 2, 4), b"abc", 2)
    assert asm.add("fedjet.j.update.aws", chunk("x", 1, 2, 4), b"cd", 3).data == b"abcd"


def test_a_forged_chunk_under_a_pending_blobs_id_is_refused_and_the_blob_completes():
    asm = assembler()
    asm.add("s", chunk("x", 0, 2, 4), b"ab", 1)
    for headers, data in ((chunk("x", 1, 3, 6), b"zz"), (chunk("x", 1, 2, 4), b"toolong")):
        with pytest.raises(BlobError):
            asm.add("s", headers, data, 2)
    assert asm.add("s", chunk("x", 1, 2, 4), b"cd", 3).data == b"abcd"


def test_lengths_are_checked_and_nothing_is_allocated_for_a_declared_size():
    asm = BlobAssembler(max_blob_bytes=1 << 30, max_pending_bytes=1 << 31)
    tracemalloc.start()
    try:
        with pytest.raises(BlobError):  # a 64 MiB blob whose first chunk is not the size it must be
            asm.add("s", chunk("big", 0, 64, 1 << 26), b"x" * 4096, 1)
        assert asm.add("s", chunk("big", 0, 64, 1 << 26), b"x" * (1 << 20), 2) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated for one 1 MiB chunk of a declared 64 MiB blob"
    with pytest.raises(BlobError):  # 1-byte chunks of a large blob would hold a message per byte
        asm.add("s", chunk("tiny", 0, 1 << 20, 1 << 20), b"x", 3)


def test_one_subject_never_evicts_another_subjects_partial_blob():
    asm = assembler(max_blob_bytes=100, max_pending_bytes=100, max_blobs_per_subject=2)
    asm.add("aws", chunk("honest", 0, 2, 80), b"x" * 40, 1)
    for n in range(10):  # a flood of never-completing blobs on gcp's subject
        asm.add("gcp", chunk(f"junk{n}", 0, 2, 80), b"y" * 40, 2 + n)
    assert {gone.key[0] for gone in asm.evicted} == {"gcp"}
    assert asm.add("aws", chunk("honest", 1, 2, 80), b"z" * 40, 20).data == b"x" * 40 + b"z" * 40
    asm.evicted.clear()
    asm.add("gcp", chunk("junk-new", 0, 2, 80), b"y" * 40, 21)
    assert [gone.key for gone in asm.evicted] == [("gcp", "junk9")]  # the oldest of that subject


def test_a_subjects_held_chunks_are_capped():
    asm = assembler(max_blob_bytes=100, max_pending_bytes=10_000, max_chunks_per_subject=4)
    for n in range(3):
        asm.add("aws", chunk(f"b{n}", 0, 2, 4), b"ab", n)
    assert asm.pending_chunks("aws") == 3
    for n in range(3, 6):
        asm.add("aws", chunk(f"b{n}", 0, 2, 4), b"ab", n)
    assert asm.pending_chunks("aws") <= 4 and len(asm.evicted) == 2
    with pytest.raises(BlobError):  # a blob that could never fit is refused at its first chunk
        asm.add("aws", chunk("huge", 0, 5, 10), b"ab", 9)


def test_partial_blobs_expire_when_nothing_arrives():
    asm = assembler(ttl_s=60.0)
    asm.add("s", chunk("slow", 0, 2, 4), b"ab", 1, now=0.0)
    asm.add("s", chunk("stuck", 0, 2, 4), b"ab", 2, now=30.0)
    asm.expire(now=70.0)
    assert [(gone.key, gone.seqs) for gone in asm.evicted] == [(("s", "slow"), [1])]
    assert asm.add("s", chunk("stuck", 1, 2, 4), b"cd", 3, now=80.0).data == b"abcd"


def test_job_and_cloud_names_are_validated():
    with pytest.raises(ConfigError):
        JobSubjects("bad.job")
    with pytest.raises(ConfigError):
        JobSubjects("ok").update("a*b")


def test_a_read_waits_out_a_broker_whose_jetstream_is_away_and_reads_everything(tmp_path, monkeypatch):
    """A reader asked for while JetStream does not answer (here: the server came back without
    it, as a cluster answers right after a node died) is asked for again, and once JetStream is
    back the read returns every message; a reader that never gets an answer is a typed error."""
    store = tmp_path / "store"
    first = EmbeddedNatsServer(store)
    url = first.start()
    port = int(url.rsplit(":", 1)[1])
    subjects = JobSubjects("comeback")

    async def publish() -> None:
        nc = await connect(url, "writer")
        js = nc.jetstream()
        await ensure_job_streams(js, subjects)
        for i in range(5):
            await js.publish(subjects.global_head, f"head {i}".encode())
        await close_quietly(nc)

    asyncio.run(publish())
    first.stop()
    plain = EmbeddedNatsServer(tmp_path / "plain", port=port, jetstream=False)
    plain.start()
    back = EmbeddedNatsServer(store, port=port)

    async def read_across_the_comeback() -> list[bytes]:
        nc = await connect(url, "reader")
        js = nc.jetstream(timeout=1.0)
        reading = asyncio.create_task(_read_all(js, subjects))
        await asyncio.sleep(1.5)  # the reader has been refused at least once
        assert not reading.done()
        plain.stop()
        await asyncio.to_thread(back.start)
        try:
            return await asyncio.wait_for(reading, 60)
        finally:
            await close_quietly(nc)

    try:
        got = asyncio.run(read_across_the_comeback())
    finally:
        plain.stop()
        back.stop()
    assert got == [f"head {i}".encode() for i in range(5)]

    monkeypatch.setattr("fedjet.broker.retry.FIRST_WAIT_S", 0.01)  # the same tries, quickly
    plain = EmbeddedNatsServer(tmp_path / "plain2", jetstream=False)
    lonely = plain.start()

    async def never() -> None:
        nc = await connect(lonely, "reader")
        try:
            await _read_all(nc.jetstream(timeout=0.2), subjects)
        finally:
            await close_quietly(nc)

    try:
        with pytest.raises(BrokerError, match="no answer after"):
            asyncio.run(never())
    finally:
        plain.stop()


async def _read_all(js, subjects: JobSubjects) -> list[bytes]:
    return [msg.data async for msg in read_range(js, subjects.global_stream, subjects.global_head)]
