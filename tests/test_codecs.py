"""Codec stages and the whole pipeline: round trips, bounds, error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjet.codecs.feedback import compress_with_feedback
from fedjet.codecs.frame import Limits
from fedjet.codecs.indices import (
    decode_elias_fano,
    decode_indices,
    decode_varints,
    elias_fano_sizes,
    encode_elias_fano,
    encode_indices,
    encode_varints,
)
from fedjet.codecs.lowrank import effective_rank
from fedjet.codecs.messages import Update, UpdateHeader, decode_update, encode_update
from fedjet.codecs.pipeline import CodecSpec, compress, decode_tensors
from fedjet.codecs.quant import dequantize, quantize
from fedjet.codecs.sparse import SparseTensor
from fedjet.codecs.topk import kept_count, topk_indices
from fedjet.errors import ConfigError, DecodeError
from fedjet.worker.delta import DeltaTracker

HEADER = UpdateHeader(job="j", cloud="aws", worker="0", seq=1, base_version=0, samples=1, loss=1.0)


def dense(t) -> torch.Tensor:
    return t.to_dense() if isinstance(t, SparseTensor) else t


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("dense", "dense"),
        ("topk:0.01+int8", "topk:0.01+int8"),
        ("topk:0.05:global+int4:64", "topk:0.05:global+int4:64"),
        ("fp16", "fp16"),
        ("int8:256", "int8"),
        ("int2", "int2"),
        ("int1:1024", "int1:1024"),
        ("topk:0.01:warmup=0.25/3+int8", "topk:0.01:warmup=0.25/3+int8"),
        ("topk:0.05:warmup=0.5/2:global+int4", "topk:0.05:global:warmup=0.5/2+int4"),
        ("int1+down", "int1+down=int1"),
        ("topk:0.01+int8+down=topk:0.05+int8", "topk:0.01+int8+down=topk:0.05+int8"),
        ("dense+down=int2", "dense+down=int2"),
        ("lowrank:4+int8", "lowrank:4+int8"),
        ("lowrank:2+down=lowrank:1+int4:64", "lowrank:2+down=lowrank:1+int4:64"),
    ],
)
def test_codec_specs_parse_to_a_canonical_form(text, canonical):
    assert CodecSpec.parse(text).text == canonical


@pytest.mark.parametrize(
    "text",
    [
        "", "topk", "topk:2", "topk:0.1:sideways", "int9", "int8:0", "zip", "int3", "int1:0",
        "topk:0.1:warmup=0.01/3", "topk:0.1:warmup=0.5/0", "topk:0.1:warmup=0.5", "topk:0.1:global:tensor:x",
        "+down", "int8+downlink", "int8+down=", "int8+down=zip", "int8+down=int8+down",
        "lowrank", "lowrank:0", "lowrank:2:1", "topk:0.1+lowrank:4",
    ],
)  # fmt: skip
def test_bad_codec_specs_are_config_errors(text):
    with pytest.raises(ConfigError):
        CodecSpec.parse(text)


@pytest.mark.parametrize("n, density", [(1_000_000, 0.01), (300_000, 0.001), (2_000_000, 0.05)])
def test_sampled_topk_keeps_exactly_the_largest_values(n, density):
    values = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    k = kept_count(n, density)
    got = topk_indices(values, k, seed=1)
    assert got.size == k and np.all(np.diff(got) > 0)  # the trim makes the count exact
    truth = np.sort(np.argsort(-np.abs(values), kind="stable")[:k])
    assert np.array_equal(got, truth)


def test_global_topk_keeps_the_target_fraction_across_tensors():
    gen = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(400_000, generator=gen), "small": torch.randn(1000, generator=gen) * 10}
    out = compress(tensors, CodecSpec.parse("topk:0.01:global"))
    kept = sum(e["k"] for e in out.entries)
    assert abs(kept - 4010) <= 401
    small = next(e for e in out.entries if e["n"] == "small")
    assert small["k"] > 500  # one threshold across tensors favours the large-magnitude one


@given(
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=2000),
    bits=st.sampled_from(["int8", "int4"]),
    chunk=st.sampled_from([1, 7, 64, 256]),
)
@settings(max_examples=150, deadline=None)
def test_quantized_values_lie_within_half_a_step(values, bits, chunk):
    x = np.array(values, dtype=np.float32)
    packed, scales = quantize(x, bits, chunk)
    back = dequantize(packed, scales, x.size, bits, chunk)
    step = np.repeat(np.frombuffer(scales, dtype=np.float32), chunk)[: x.size]
    assert np.all(np.abs(back - x) <= step / 2 + 1e-6 * np.abs(x) + 1e-30)


@given(st.sets(st.integers(0, 99_999), max_size=3000))
@settings(max_examples=100, deadline=None)
def test_indices_round_trip_in_the_smaller_encoding(index_set):
    indices = np.array(sorted(index_set), dtype=np.int64)
    kind, payload = encode_indices(indices, 100_000)
    assert len(payload) <= -(-100_000 // 8)
    assert np.array_equal(decode_indices(kind, payload, indices.size, 100_000), indices)


def test_varints_round_trip_large_values_and_reject_bad_streams():
    values = np.array([0, 1, 127, 128, 300, 2**32, 2**63 - 1], dtype=np.uint64)
    assert np.array_equal(decode_varints(encode_varints(values), values.size), values)
    with pytest.raises(DecodeError):
        decode_varints(b"\x80\x80", 1)  # unterminated
    with pytest.raises(DecodeError):
        decode_indices("varint", encode_varints(np.array([5, 0], dtype=np.uint64)), 2, 10)  # repeat
    with pytest.raises(DecodeError):
        decode_indices("varint", encode_varints(np.array([50], dtype=np.uint64)), 1, 10)  # out of range
    wraps = np.array([2**63, 2**63 + 1], dtype=np.uint64)  # their running sum wraps to a small number
    with pytest.raises(DecodeError):
        decode_indices("varint", encode_varints(wraps), 2, 10)


shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)
codecs = st.sampled_from(["dense", "fp16", "int8", "topk:0.1", "topk:0.01+int8", "topk:0.3:global+int4:16", "topk:1"])
low_bit_codecs = st.sampled_from(
    ["int2", "int1:64", "topk:0.2+int1", "topk:0.3:global+int2:16", "int1+down", "lowrank:2+int8", "lowrank:3"]
)


@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    codec=codecs,
    half=st.booleans(),
    seed=st.integers(0, 99),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_whole_pipeline_round_trips_what_the_sender_says_it_sent(shape_list, codec, half, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(s, generator=gen) for i, s in enumerate(shape_list)}
    if half:
        tensors["t0"] = tensors["t0"].half()
    spec = CodecSpec.parse(codec)
    compressed = compress(tensors, spec)
    decoded = decode_tensors(compressed.entries, Limits())
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.allclose(dense(decoded[name]).float(), dense(compressed.sent[name]).float(), atol=0, rtol=0)
        assert tuple(dense(decoded[name]).shape) == tuple(tensor.shape)
        if spec.text == "dense":
            assert torch.equal(decoded[name], tensor)
    frame = encode_update(Update(HEADER, {n: t.float() for n, t in tensors.items()}), spec)
    assert decode_update(frame, Limits()).header.codec == spec.text


def test_error_feedback_conserves_the_sum_of_updates():
    spec = CodecSpec.parse("topk:0.05+int8")
    gen = torch.Generator().manual_seed(0)
    truth = {"w": torch.zeros(4000), "b": torch.zeros(3, 50)}
    sent_total = {n: torch.zeros_like(t) for n, t in truth.items()}
    residual = None
    for step in range(40):
        update = {n: torch.randn(t.shape, generator=gen) * (1 + step % 3) for n, t in truth.items()}
        for n in truth:
            truth[n] += update[n]
        compressed, residual = compress_with_feedback(update, residual, spec, seed=step)
        for n, sent in compressed.sent.items():
            sent_total[n] += dense(sent)
    for n in truth:
        assert torch.allclose(sent_total[n] + residual[n], truth[n], atol=1e-3)
        assert not torch.allclose(sent_total[n], truth[n], atol=1e-1)  # the residual matters


def test_topk_int8_is_over_100x_smaller_than_dense_float32():
    tensors = {"w": torch.randn(1_000_000)}
    dense_frame = encode_update(Update(HEADER, tensors), CodecSpec.dense())
    small_frame = encode_update(Update(HEADER, tensors), CodecSpec.parse("topk:0.01+int8"))
    assert len(dense_frame) / len(small_frame) >= 100


def test_bench_codec_prints_one_json_object_with_same_run_ratios():
    import json

    from tests.conftest import run_fedjet

    result = run_fedjet(
        "bench", "codec", "--params", "300000", "--density", "0.01", "--repeats", "2", "--json", timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("dense_bytes", "wire_bytes", "ratio", "encode_mb_s", "decode_mb_s", "memcpy_mb_s"):
        assert out[key] > 0
    # what goes into the ratio: 300,000 float32 values, and on the wire at least one byte for each of
    # the 3,000 kept values (int8) but at most a hundredth of the dense size
    assert out["dense_bytes"] == 1_200_000 and 3_000 < out["wire_bytes"] <= 12_000 and out["ratio"] >= 100


@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    codec=low_bit_codecs,
    seed=st.integers(0, 99),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_low_bit_codecs_round_trip_what_the_sender_says_it_sent(shape_list, codec, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(s, generator=gen) for i, s in enumerate(shape_list)}
    compressed = compress(tensors, CodecSpec.parse(codec))
    decoded = decode_tensors(compressed.entries, Limits())
    for name in tensors:
        assert torch.equal(dense(decoded[name]).float(), dense(compressed.sent[name]).float())


def test_warmup_decays_geometrically_from_its_start_to_the_target_and_stays():
    spec = CodecSpec.parse("topk:0.01:warmup=0.25/3+int8")
    densities = [spec.density_at(v) for v in range(6)]
    assert densities[0] == 0.25 and densities[3:] == [0.01, 0.01, 0.01]
    assert densities[1] == pytest.approx(0.25 * 0.04 ** (1 / 3)) and densities[0] > densities[1] > densities[2] > 0.01
    assert spec.at(1).density == densities[1] and spec.at(1).text == spec.text and spec.at(1).warmup is None
    assert CodecSpec.parse("topk:0.01+int8").at(0).density == 0.01


def test_delta_tracker_compresses_at_the_density_of_its_base_version():
    tracker = DeltaTracker(CodecSpec.parse("topk:0.01:warmup=0.5/2"))
    start = {"w": torch.zeros(10_000)}
    moved = {"w": torch.randn(10_000, generator=torch.Generator().manual_seed(0))}
    kept = []
    for version in (0, 1, 2, 7):
        tracker.rebase(start, version)
        kept.append(tracker.compress_delta(moved).entries[0]["k"])
    assert kept == [5000, 708, 100, 100]


def test_topk_that_keeps_everything_sends_a_dense_entry_without_indices():
    out = compress({"w": torch.randn(300)}, CodecSpec.parse("topk:1+int8"))
    assert out.entries[0]["e"] == "dense" and "i" not in out.entries[0]


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_sign_quantization_keeps_each_chunks_l1_mass(chunk):
    x = np.random.default_rng(chunk).standard_normal(1001).astype(np.float32)
    packed, scales = quantize(x, "int1", chunk)
    back = dequantize(packed, scales, x.size, "int1", chunk)
    assert len(packed) == 126 and np.array_equal(np.sign(back), np.where(x < 0, -1, 1))
    for start in range(0, x.size, chunk):
        part = slice(start, start + chunk)
        assert np.abs(back[part]).sum() == pytest.approx(np.abs(x[part]).sum(), rel=1e-5)


def test_ternary_quantization_keeps_large_values_at_their_mean_magnitude():
    x = np.array([0.0, 0.1, -0.1, 3.0, -5.0, 4.0, 0.05, -0.2], dtype=np.float32)
    packed, scales = quantize(x, "int2", 8)
    back = dequantize(packed, scales, x.size, "int2", 8)
    assert len(packed) == 2 and np.allclose(back, [0, 0, 0, 4, -4, 4, 0, 0])
    assert dequantize(bytes([2 + 2 * 81, 0]), scales, x.size, "int2", 8)[[0, 4]].tolist() == [4, 4]  # base 3
    with pytest.raises(DecodeError):  # 3^5 and above hold no five ternary levels
        dequantize(bytes([243, 0]), scales, x.size, "int2", 8)
    with pytest.raises(DecodeError):
        dequantize(packed + b"\0", scales, x.size, "int2", 8)


@pytest.mark.parametrize("codec", ["int1", "int2", "topk:0.05:warmup=0.5/3+int1"])
def test_error_feedback_conserves_the_sum_with_low_bit_codecs(codec):
    spec = CodecSpec.parse(codec)
    gen = torch.Generator().manual_seed(1)
    truth, sent_total, residual = torch.zeros(5000), torch.zeros(5000), None
    for step in range(20):
        update = torch.randn(5000, generator=gen)
        truth += update
        compressed, residual = compress_with_feedback({"w": update}, residual, spec.at(step), seed=step)
        sent_total += dense(compressed.sent["w"])
    assert torch.allclose(sent_total + residual["w"], truth, atol=1e-3)


@pytest.mark.parametrize("numel, count", [(1_000_000, 10_000), (1_000_000, 100_000), (1000, 1), (64, 63), (7, 7)])
def test_elias_fano_round_trips_and_beats_varints_at_moderate_density(numel, count):
    indices = np.sort(np.random.default_rng(count).choice(numel, count, replace=False)).astype(np.int64)
    payload = encode_elias_fano(indices, numel)
    assert len(payload) == sum(elias_fano_sizes(count, numel))
    assert np.array_equal(decode_elias_fano(payload, count, numel), indices)
    kind, best = encode_indices(indices, numel)
    assert np.array_equal(decode_indices(kind, best, count, numel), indices)
    if numel == 1_000_000:
        varint = encode_varints(np.diff(indices, prepend=0).astype(np.uint64))
        assert kind == "ef" and len(best) < 0.9 * len(varint)


def test_elias_fano_refuses_hostile_payloads():
    indices = np.array([3, 9, 40, 41, 99], dtype=np.int64)
    payload = encode_elias_fano(indices, 100)
    with pytest.raises(DecodeError):
        decode_elias_fano(payload + b"\0", 5, 100)  # wrong size for the manifest
    with pytest.raises(DecodeError):
        decode_elias_fano(payload, 4, 100)  # another count changes the layout
    upper = bytearray(payload)
    upper[0] |= 0xFF  # more high bits set than indices
    with pytest.raises(DecodeError):
        decode_elias_fano(bytes(upper), 5, 100)
    with pytest.raises(DecodeError):  # the same index twice
        decode_elias_fano(encode_elias_fano(np.array([5, 5, 7, 8, 9], dtype=np.int64), 100), 5, 100)
    with pytest.raises(DecodeError):  # beyond the tensor (a high part that overflows numel)
        decode_elias_fano(encode_elias_fano(np.array([1, 2, 3, 4, 103], dtype=np.int64), 104), 5, 100)
    with pytest.raises(DecodeError):
        decode_indices("rice", payload, 5, 100)


def test_lowrank_recovers_a_low_rank_matrix_and_leaves_vectors_to_the_quantizer():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(120, 3, generator=gen) @ torch.randn(3, 200, generator=gen)
    tensors = {"m": matrix, "bias": torch.randn(200, generator=gen), "small": torch.randn(4, 4, generator=gen)}
    out = compress(tensors, CodecSpec.parse("lowrank:3+int8"), seed=5)
    entries = {e["n"]: e for e in out.entries}
    assert entries["m"]["e"] == "lowrank" and entries["m"]["k"] == 3 * (120 + 200)
    assert entries["bias"]["e"] == entries["small"]["e"] == "dense"  # factors would not be 2x smaller
    assert float((out.sent["m"] - matrix).norm() / matrix.norm()) < 0.02
    raw = compress({"m": matrix}, CodecSpec.parse("lowrank:3"), seed=5).sent["m"]
    assert torch.allclose(raw, matrix, atol=1e-3)
    assert (effective_rank((200,), 4), effective_rank((4, 4), 4), effective_rank((64, 64, 2), 4)) == (0, 0, 4)


def test_lowrank_decoding_refuses_a_rank_that_does_not_fit_the_shape():
    entry = compress({"m": torch.randn(40, 50)}, CodecSpec.parse("lowrank:2+int8")).entries[0]
    for bad in ({"r": 3}, {"r": 0}, {"k": 181}, {"d": "float16"}, {"r": 41, "k": 41 * 90}):
        with pytest.raises(DecodeError):
            decode_tensors([entry | bad], Limits())
