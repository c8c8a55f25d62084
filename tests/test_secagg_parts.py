"""Secure aggregation (issue 13): its parts alone: Shamir shares, fixed point, the PRG, sparse indices, the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedjet.errors import ConfigError
from fedjet.secagg import (
    EncodingError,
    FixedPoint,
    OutOfRangeError,
    RoundConfig,
    SecAggSchemaError,
    ShareDelivery,
    ShareError,
    UnmaskRequest,
    from_wire,
    random_k_indices,
)
from fedjet.secagg.prg import expand
from fedjet.secagg.shamir import Share, combine, split


def test_shamir_any_threshold_subset_reconstructs_and_bad_sets_are_typed_errors() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    assert combine([shares[5], shares[1], shares[3]], 3) == secret
    assert combine(shares.values(), 3) == secret
    with pytest.raises(ShareError, match="cannot reconstruct"):
        combine([shares[1], shares[2]], 3)
    with pytest.raises(ShareError, match="duplicate"):
        combine([shares[1], shares[1], shares[2]], 3)
    bad = Share(x=4, y=(shares[4].y + 1))
    with pytest.raises(ShareError, match="inconsistent"):
        combine([shares[1], shares[2], shares[3], bad], 3)
    assert Share.from_bytes(shares[2].to_bytes()) == shares[2]
    with pytest.raises(ShareError):
        Share.from_bytes(b"\x00" * 10)


def test_fixed_point_round_trip_overflow_bound_range_check_and_refusals() -> None:
    fp = FixedPoint(scale=1024.0, bound=2.0)
    x = np.array([-3.0, -1.5, 0.0, 0.001, 1.999, 5.0], dtype=np.float32)
    np.testing.assert_allclose(fp.decode(fp.encode(x)), np.clip(x, -2, 2), atol=0.5 / 1024)
    np.testing.assert_allclose(fp.decode(fp.encode(x, weight=7), weight_total=7, unit_total=7), np.clip(x, -2, 2),
                               atol=0.5 / 1024)  # fmt: skip
    n = 1000
    top = fp.max_weight(n)
    worst = [fp.encode(np.full(4, 2.0), weight=top) for _ in range(n)]  # every member at the bound
    total = np.zeros(4, dtype=np.uint64)
    for v in worst:
        total += v
    np.testing.assert_allclose(fp.decode(total, weight_total=n * top, unit_total=n * top), 2.0)  # no wrap
    fp.check_members(fp.max_members)
    with pytest.raises(ConfigError):
        fp.check_members(fp.max_members + 1)
    with pytest.raises(ValueError):
        FixedPoint(scale=2.0**60, bound=1.0)
    with pytest.raises(EncodingError):
        fp.encode(np.array([np.nan]))
    for bad in (0, 1.5, fp.max_weight(1) + 1):
        with pytest.raises(EncodingError):
            fp.encode(x, weight=bad)
    with pytest.raises(OutOfRangeError):  # more than two inputs clipped to 2 can add up to
        fp.decode(fp.encode(np.full(3, 5.0), weight=3) + fp.encode(np.full(3, 5.0)), weight_total=2)
    as_bf16 = torch.tensor(x, dtype=torch.bfloat16)
    np.testing.assert_array_equal(fp.encode(as_bf16), fp.encode(as_bf16.float().numpy()))


def test_prg_is_deterministic_and_domain_separated() -> None:
    seed = b"\x07" * 32
    a = expand(seed, 1000, purpose="pair", round_id=1, context=("job", "a", "b"))
    np.testing.assert_array_equal(a, expand(seed, 1000, purpose="pair", round_id=1, context=("job", "a", "b")))
    np.testing.assert_array_equal(a[:10], expand(seed, 10, purpose="pair", round_id=1, context=("job", "a", "b")))
    for other in (
        expand(seed, 1000, purpose="self", round_id=1, context=("job", "a", "b")),
        expand(seed, 1000, purpose="pair", round_id=2, context=("job", "a", "b")),
        expand(seed, 1000, purpose="pair", round_id=1, context=("job", "a", "c")),
    ):
        assert (other == a).mean() < 0.01


def test_random_k_indices_are_deterministic_distinct_and_sorted() -> None:
    seed = b"\x01" * 32
    for numel, k in ((1000, 10), (1000, 900), (10, 10), (10, 0), (1 << 30, 1000)):
        idx = random_k_indices(seed, numel, k)
        assert len(idx) == k and len(np.unique(idx)) == k and np.all(np.diff(idx) > 0)
        assert idx.min(initial=0) >= 0 and idx.max(initial=0) < numel
        np.testing.assert_array_equal(idx, random_k_indices(seed, numel, k))
    assert not np.array_equal(random_k_indices(seed, 1000, 10), random_k_indices(b"\x02" * 32, 1000, 10))


def test_wire_tolerates_unknown_keys_and_is_strict_on_types() -> None:
    request = UnmaskRequest(round_id=3, survivors=("a", "b"), dropped=())
    raw = {**request.to_wire(), "future": 1}
    assert from_wire(raw) == request
    with pytest.raises(SecAggSchemaError):
        from_wire({**raw, "round": True})
    with pytest.raises(SecAggSchemaError):
        from_wire({**raw, "survivors": [1]})
    with pytest.raises(SecAggSchemaError):
        from_wire({**raw, "v": 99})
    with pytest.raises(SecAggSchemaError):
        ShareDelivery.from_wire(raw)


def test_round_config_refuses_thresholds_at_or_below_half() -> None:
    with pytest.raises(ConfigError):
        RoundConfig(job="j", round_id=0, threshold=2, members=("a", "b", "c", "d"), numel=1)
    with pytest.raises(ConfigError):
        RoundConfig(job="j", round_id=0, threshold=2, members=("b", "a"), numel=1)
