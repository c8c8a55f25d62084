"""msgpack framing of updates and globals: round trips and typed rejection."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest
import torch

from fedjet.codecs.frame import Limits, pack_frame, unpack_frame
from fedjet.codecs.messages import (
    GlobalHeader,
    GlobalVersion,
    Update,
    UpdateHeader,
    decode_global,
    decode_update,
    encode_global,
    encode_update,
)
from fedjet.codecs.pipeline import CodecSpec
from fedjet.codecs.record import ContributionRecord, VersionRecord
from fedjet.errors import CodecError, DecodeError, LimitError, SchemaError, ValidationError

LIMITS = Limits()


def header(**overrides) -> UpdateHeader:
    fields = dict(job="j", cloud="aws", worker="0", seq=7, base_version=3, samples=64, loss=2.5)
    return UpdateHeader(**(fields | overrides))


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=gen),
        "b": torch.randn(5, generator=gen),
        "h": torch.randn(2).half(),
    }


def test_dense_update_round_trips_exactly():
    update = Update(header(), tensors())
    back = decode_update(encode_update(update, CodecSpec.dense()), LIMITS)
    assert back.header == update.header
    assert set(back.tensors) == set(update.tensors)
    for name, tensor in update.tensors.items():
        assert back.tensors[name].dtype == tensor.dtype
        assert torch.equal(back.tensors[name], tensor)


def test_global_round_trips_and_its_record_too():
    version = GlobalVersion(GlobalHeader(job="j", version=4, hash="ab", final=True), tensors())
    pieces, header = encode_global(version)
    payload = bytes(pieces)
    back = decode_global(payload, LIMITS)
    assert back.header == version.header == header
    assert all(torch.equal(back.tensors[n], t) for n, t in version.tensors.items())
    record = VersionRecord(
        strategy="fedavg",
        contributions=(ContributionRecord(cloud="aws", seq=1, stream_seq=3, base=0, staleness=0, samples=8, loss=1.5),),
        train_loss=1.5,
    )
    assert VersionRecord.from_bytes(record.to_bytes()) == record
    with pytest.raises(SchemaError):
        VersionRecord.from_bytes(msgpack.packb([1]))
    with pytest.raises(SchemaError):  # tolerant of unknown keys, strict on types
        VersionRecord.from_bytes(msgpack.packb({"strategy": "fedavg", "bytes_up": "many"}))
    assert VersionRecord.from_bytes(msgpack.packb({"strategy": "x", "new_field": 1})).strategy == "x"


def test_a_first_batch_record_reads_with_its_flat_progress():
    flat = {"strategy": "fedavg", "contributions": [], "applied_total": 4, "applied_through": 9, "resume_from": 7}
    record = VersionRecord.from_bytes(msgpack.packb({**flat, "guard": {"aws/0": 12}, "rejected": {"BlobError": 1}}))
    assert record.progress.applied_through == 9 and record.progress.guard == {"aws/0": 12}


def test_unknown_format_version_is_a_schema_error():
    frame = msgpack.packb({"fv": 99, "type": "update", "header": {}, "tensors": []})
    with pytest.raises(SchemaError, match="format version"):
        unpack_frame(frame, LIMITS, "update")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"fv": 1}),
        b"\xdd\xff\xff\xff\xff",
    ],
)
def test_malformed_frames_are_rejected_with_typed_errors(data: bytes):
    with pytest.raises(CodecError):
        decode_update(data, LIMITS)


def test_truncated_frame_is_a_decode_error():
    frame = encode_update(Update(header(), tensors()), CodecSpec.dense())
    with pytest.raises(DecodeError):
        decode_update(frame[: len(frame) // 2], LIMITS)


def test_value_bytes_that_do_not_fit_the_shape_are_rejected():
    frame = msgpack.unpackb(encode_update(Update(header(), tensors()), CodecSpec.dense()))
    frame["tensors"][0]["v"] = frame["tensors"][0]["v"][:-4]
    with pytest.raises(DecodeError, match="do not fit"):
        decode_update(msgpack.packb(frame), LIMITS)


def test_declared_terabyte_shape_is_refused_before_allocation():
    entry = {"n": "x", "s": [1 << 20, 1 << 20], "d": "float32", "k": 1, "e": "dense", "v": b"1234"}
    frame = pack_frame("update", vars(header()) | {}, [entry])
    with pytest.raises(LimitError):
        decode_update(frame, LIMITS)


def test_header_fields_are_type_checked():
    raw = vars(header()) | {"seq": "seven"}
    with pytest.raises(SchemaError, match="seq"):
        decode_update(pack_frame("update", raw, []), LIMITS)
    raw = vars(header()) | {"loss": float("nan")}
    with pytest.raises(SchemaError):
        decode_update(pack_frame("update", raw, []), LIMITS)


def test_unknown_header_keys_are_ignored_for_forward_compatibility():
    raw = vars(header()) | {"from_the_future": [1, 2]}
    assert decode_update(pack_frame("update", raw, []), LIMITS).header == header()


def test_global_delta_carries_only_changed_values_and_rebuilds_exactly():
    from fedjet.codecs.messages import delta_entries
    from fedjet.codecs.tensors import weights_hash

    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(200, 50, generator=gen), "b": torch.zeros(50)}
    new = {n: t.clone() for n, t in base.items()}
    new["w"].view(-1)[torch.randperm(10_000, generator=gen)[:150]] += 0.25
    new["b"][3] = -0.0  # same value as 0.0, different bits: must still count as a change
    header = GlobalHeader(job="j", version=5, hash=weights_hash(new))
    pieces, delta_header = encode_global(GlobalVersion(header, new), base, base_version=4)
    delta = bytes(pieces)
    full, full_header = encode_global(GlobalVersion(header, new))
    assert delta_header.delta_from == 4 and full_header.delta_from == -1
    assert len(delta) * 10 < len(full)
    back = decode_global(delta, LIMITS, base)
    assert back.header.delta_from == 4 and weights_hash(back.tensors) == header.hash
    with pytest.raises(ValidationError, match="not held"):
        decode_global(delta, LIMITS, None)
    everything = {n: t + 1 for n, t in base.items()}
    assert delta_entries(everything, base) is None  # not smaller: send the full version
    assert decode_global(bytes(full), LIMITS).header.delta_from == -1
    big = {"w": base["w"], "b": torch.zeros(50), "c": torch.zeros(20_000)}  # a fragment round's version:
    moved = dict(big, b=big["b"] + 1)  # one tensor all changed, the others the very same tensors
    entries = delta_entries(moved, big)
    assert entries is not None and {e["n"]: e["e"] for e in entries} == {"b": "dense", "c": "sparse", "w": "sparse"}
    pieces, _ = encode_global(GlobalVersion(replace(header, hash=weights_hash(moved)), moved), big, base_version=4)
    assert len(pieces) < 50 * 4 + 1024  # the changed tensor's values and no indices
    assert weights_hash(decode_global(bytes(pieces), LIMITS, big).tensors) == weights_hash(moved)


def _as_bytes(value):
    """A parsed frame with its values' views read out (to compare with msgpack's own parse)."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {k: _as_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_bytes(v) for v in value]
    return value


def _big_update() -> Update:
    gen = torch.Generator().manual_seed(4)
    big = {"w": torch.randn(300, 200, generator=gen), "b": torch.randn(30_000, generator=gen), "s": torch.randn(3)}
    return Update(header(), big)


@pytest.mark.parametrize("codec", ["dense", "topk:0.3", "topk:0.1+int8", "lowrank:4", "fp16"])
def test_a_frame_parses_as_msgpack_does_with_its_big_values_left_in_place(codec):
    frame = encode_update(_big_update(), CodecSpec.parse(codec))
    unpacked = msgpack.unpackb(frame, raw=False)
    header_raw, entries = unpack_frame(frame, LIMITS, "update")
    assert _as_bytes({**unpacked, "header": header_raw, "tensors": entries}) == unpacked
    writable = bytearray(frame)
    _, in_place = unpack_frame(writable, LIMITS, "update")
    views = [v for e in in_place for v in e.values() if isinstance(v, memoryview)]
    assert views or codec != "dense"
    assert all(v.obj is not None and not v.readonly for v in views)  # views of the frame, not copies


def test_a_writable_frame_decodes_to_tensors_over_its_own_bytes_and_read_only_bytes_are_copied():
    import numpy as np

    update = _big_update()
    frame = bytearray(encode_update(update, CodecSpec.dense()))
    decoded = decode_update(frame, LIMITS)
    assert all(torch.equal(decoded.tensors[n], t) for n, t in update.tensors.items())
    assert np.shares_memory(decoded.tensors["b"].numpy(), np.frombuffer(frame, dtype=np.uint8))
    copied = decode_update(bytes(frame), LIMITS)
    copied.tensors["b"].add_(1.0)  # a copy: writable, and nothing else changes
    assert torch.equal(decoded.tensors["b"], update.tensors["b"])


def test_a_mangled_frame_is_a_codec_error_or_what_msgpack_reads_never_anything_else():
    import random

    frame = encode_update(_big_update(), CodecSpec.parse("topk:0.3+int8"))
    rng = random.Random(11)
    for trial in range(400):
        bad = bytearray(frame)
        if trial % 3 == 0:
            bad = bad[: rng.randrange(len(bad))]
        for _ in range(rng.randint(1, 4) if bad else 0):  # mostly where the structure is: names, headers
            bad[rng.randrange(min(len(bad), 300 if trial % 2 else len(bad)))] = rng.randrange(256)
        try:
            header_raw, entries = unpack_frame(bytes(bad), LIMITS, "update")
        except CodecError:
            continue
        assert _as_bytes({**msgpack.unpackb(bytes(bad), raw=False), "header": header_raw, "tensors": entries}) == (
            msgpack.unpackb(bytes(bad), raw=False)
        )
    for hostile in (
        b"\x91" * 100 + b"\xc0",  # lists nested a hundred deep
        b"\xdd\xff\xff\xff\xff",  # a list that says it has four billion items
        b"\xdf\xff\xff\xff\xff",  # a map likewise
        b"\xc6\xff\xff\xff\xff" + b"x" * 10,  # a bin longer than the frame
        b"\x81\x01\x02",  # a map key that is not a string
        b"\x80\x80",  # bytes after the frame's end
        b"",
    ):
        with pytest.raises(DecodeError):
            unpack_frame(hostile, LIMITS, "update")
