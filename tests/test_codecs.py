"""Codec stages and the whole pipeline: round trips, bounds, error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjet.codecs.feedback import compress_with_feedback
from fedjet.codecs.frame import Limits
from fedjet.codecs.indices import decode_indices, decode_varints, encode_indices, encode_varints
from fedjet.codecs.messages import Update, UpdateHeader, decode_update, encode_update
from fedjet.codecs.pipeline import CodecSpec, compress, decode_tensors
from fedjet.codecs.quant import dequantize, quantize
from fedjet.codecs.sparse import SparseTensor
from fedjet.codecs.topk import kept_count, topk_indices
from fedjet.errors import ConfigError, DecodeError

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
    ],
)
def test_codec_specs_parse_to_a_canonical_form(text, canonical):
    assert CodecSpec.parse(text).text == canonical


@pytest.mark.parametrize("text", ["", "topk", "topk:2", "topk:0.1:sideways", "int9", "int8:0", "zip"])
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
    assert out["dense_bytes"] == 1_200_000 and out["ratio"] == out["dense_bytes"] / out["wire_bytes"] >= 100
    assert out["encode_vs_memcpy"] == out["encode_mb_s"] / out["memcpy_mb_s"]
