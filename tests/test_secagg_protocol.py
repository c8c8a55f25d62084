"""Secure aggregation (issue 13): the pure double-masking protocol, end to end in memory."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import torch

from fedjet.errors import AuthenticationError, ReplayError
from fedjet.secagg import (
    Phase,
    RevealRefused,
    SecAggAbort,
    SecAggAuthError,
    SecAggProtocolError,
    ShareError,
    StaleRoundError,
    StaleShareError,
    Transcript,
    UnmaskRequest,
    Weight,
    average,
    fedavg_weights,
    gather,
    random_k_indices,
    recompute_sum,
    scatter,
)
from fedjet.secagg.shamir import Share
from tests.secagg_helpers import FP, Job, confirm_all, encoded_inputs, mask_all, ring_sum, run, to_shares


def test_three_members_unmasked_sum_equals_plain_sum_and_weighted_fedavg() -> None:
    job, numel = Job.of(3), 2000
    rng = np.random.default_rng(1)
    updates = {m: torch.from_numpy(rng.normal(0, 0.2, numel).astype(np.float32)) for m in job.names}
    plain = FP.decode(run(*job.round(2, numel), {m: FP.encode(x) for m, x in updates.items()}), weight_total=3)
    expected = sum(x.numpy().astype(np.float64) for x in updates.values())
    np.testing.assert_allclose(plain, expected, rtol=0, atol=3 / FP.scale)

    samples = {"cloud0": 10, "cloud1": 30, "cloud2": 60}
    encoded = {m: FP.encode(x, weight=samples[m]) for m, x in updates.items()}
    server, members = job.round(2, numel, round_id=2, weights={m: Weight(n, n) for m, n in samples.items()})
    total = run(server, members, encoded)
    fedavg = average(server.transcript, total, FP)  # divided by the members' own signed units
    weights = fedavg_weights(samples)
    expected = sum(weights[m] * x.numpy().astype(np.float64) for m, x in updates.items())
    np.testing.assert_allclose(fedavg, expected, rtol=0, atol=1 / FP.scale)


def test_what_the_server_holds_of_one_member_is_indistinguishable_from_uniform() -> None:
    job, numel = Job.of(3), 100_000
    ramp = np.sin(np.linspace(0, 40, numel)).astype(np.float32) * 0.9  # strongly structured
    inputs = {m: FP.encode(ramp * (i + 1) / 3) for i, m in enumerate(job.names)}
    server, members = job.round(2, numel)
    run(server, members, inputs)
    held = server.transcript.masked[0]
    y, x = held.vector, inputs[held.member]
    r = np.corrcoef(y.astype(np.float64), x.view(np.int64).astype(np.float64))[0, 1]
    assert abs(r) < 0.05
    assert abs(np.corrcoef(x.astype(np.float64), x.view(np.int64).astype(np.float64))[0, 1]) > 0.05  # has power

    def chi2(v: np.ndarray) -> float:
        counts = np.bincount(v.view(np.uint8), minlength=256)
        expected = v.nbytes / 256
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(y) < 400  # 255 degrees of freedom: p < 1e-6 beyond ~400
    assert chi2(x) > 10_000  # the same test tells the plain encoding apart


def test_member_dropping_after_sharing_keys_before_masking_leaves_exact_sum_of_the_others() -> None:
    job, numel = Job.of(3), 500
    inputs = encoded_inputs(job.names, numel)
    server, members = job.round(2, numel)
    total = run(server, members, inputs, skip_mask=["cloud1"])
    assert server.transcript.request.dropped == ("cloud1",)
    np.testing.assert_array_equal(total, inputs["cloud0"] + inputs["cloud2"])


def test_member_dropping_during_unmasking_still_counts_when_threshold_remains() -> None:
    job, numel = Job.of(3), 500
    inputs = encoded_inputs(job.names, numel)
    total = run(*job.round(2, numel), inputs, skip_reveal=["cloud0"])
    np.testing.assert_array_equal(total, ring_sum(inputs.values()))


def test_member_never_sharing_keys_is_left_out_of_the_masks() -> None:
    job, numel = Job.of(3), 300
    inputs = encoded_inputs(job.names, numel)
    total = run(*job.round(2, numel), inputs, skip_shares=["cloud2"])
    np.testing.assert_array_equal(total, inputs["cloud0"] + inputs["cloud1"])


def test_five_members_threshold_three_with_two_dropouts() -> None:
    job, numel = Job.of(5), 800
    inputs = encoded_inputs(job.names, numel, seed=5)
    total = run(*job.round(3, numel), inputs, skip_mask=["cloud1", "cloud3"])
    np.testing.assert_array_equal(total, ring_sum(inputs[m] for m in ("cloud0", "cloud2", "cloud4")))
    total = run(*job.round(3, numel, round_id=2), inputs, skip_mask=["cloud4"], skip_reveal=["cloud0"])
    np.testing.assert_array_equal(total, ring_sum(inputs[m] for m in job.names[:4]))


@pytest.mark.parametrize("stage", ["masked input", "unmasking"])
def test_below_threshold_aborts_cleanly_and_the_next_round_proceeds(stage: str) -> None:
    job, numel = Job.of(3), 200
    inputs = encoded_inputs(job.names, numel)
    server, members = job.round(3, numel, round_id=7)
    skip = {"skip_mask": ["cloud2"]} if stage == "masked input" else {"skip_reveal": ["cloud2"]}
    with pytest.raises(SecAggAbort) as info:
        run(server, members, inputs, **skip)
    assert (info.value.stage, info.value.have, info.value.threshold) == (stage, 2, 3)
    assert server.phase is Phase.ABORTED
    with pytest.raises(SecAggProtocolError):
        server.finish()
    np.testing.assert_array_equal(run(*job.round(3, numel, round_id=8), inputs), ring_sum(inputs.values()))


def test_too_few_advertisers_aborts_before_any_share_is_made() -> None:
    job = Job.of(3)
    server, members = job.round(2, 10)
    server.receive_advert(members["cloud0"].advertise())
    with pytest.raises(SecAggAbort):
        server.close_adverts()


def test_tampered_relayed_ciphertext_is_rejected_and_the_good_one_still_opens() -> None:
    job, numel = Job.of(3), 100
    server, members = job.round(2, numel)
    deliveries = to_shares(server, members)
    good = deliveries["cloud0"]
    ct = bytearray(good.ciphertexts["cloud1"])
    ct[40] ^= 1
    bad = dataclasses.replace(good, ciphertexts={**good.ciphertexts, "cloud1": bytes(ct)})
    with pytest.raises(ShareError):
        members["cloud0"].receive_shares(bad)
    assert members["cloud0"].phase is Phase.RECEIVE_SHARES  # nothing was taken from it
    members["cloud0"].receive_shares(good)
    assert members["cloud0"].phase is Phase.MASK


def test_tampered_revealed_share_is_caught_and_nothing_is_reconstructed() -> None:
    job, numel = Job.of(3), 100
    inputs = encoded_inputs(job.names, numel)
    server, members = job.round(3, numel)
    deliveries = to_shares(server, members)
    confirmations = confirm_all(server, members, mask_all(server, members, deliveries, inputs))
    reveals = {name: m.reveal(confirmations) for name, m in members.items()}
    liar = reveals["cloud1"]
    share = Share.from_bytes(liar.b_shares["cloud2"])
    forged = dict(liar.b_shares, cloud2=Share(x=share.x, y=share.y ^ 1).to_bytes())
    unsigned = dataclasses.replace(liar, b_shares=forged)
    with pytest.raises(SecAggAuthError):  # tampered in transit: the signature breaks
        server.receive_reveal(unsigned)
    resigned = dataclasses.replace(
        unsigned, sig=bytes(job.signing["cloud1"].sign(unsigned.signed_body("job")).signature)
    )
    for name in ("cloud0", "cloud2"):
        server.receive_reveal(reveals[name])
    server.receive_reveal(resigned)  # a lying member: well-formed, validly signed
    with pytest.raises(ShareError, match="commitment"):
        server.finish()
    assert server.phase is Phase.FAILED


def test_inconsistent_extra_share_is_caught_by_interpolation() -> None:
    job, numel = Job.of(5), 50
    inputs = encoded_inputs(job.names, numel)
    server, members = job.round(3, numel)
    deliveries = to_shares(server, members)
    confirmations = confirm_all(server, members, mask_all(server, members, deliveries, inputs))
    for name, m in members.items():
        reveal = m.reveal(confirmations)
        if name == "cloud4":
            share = Share.from_bytes(reveal.b_shares["cloud0"])
            forged = dict(reveal.b_shares, cloud0=Share(x=share.x, y=share.y + 1).to_bytes())
            reveal = dataclasses.replace(reveal, b_shares=forged)
            reveal = dataclasses.replace(reveal, sig=bytes(job.signing[name].sign(reveal.signed_body("job")).signature))
        server.receive_reveal(reveal)
    with pytest.raises(ShareError, match="inconsistent"):
        server.finish()


def test_shares_replayed_from_an_earlier_round_are_typed_errors() -> None:
    job, numel = Job.of(3), 100
    inputs = encoded_inputs(job.names, numel)
    old_server, old_members = job.round(2, numel, round_id=1)
    old_deliveries = to_shares(old_server, old_members)
    server, members = job.round(2, numel, round_id=2)
    for m in members.values():
        server.receive_advert(m.advertise())
    adverts = server.close_adverts()
    fresh = {name: m.share_keys(adverts) for name, m in members.items()}
    old_round_keys = dataclasses.replace(fresh["cloud0"], round_id=1)  # as if recorded in round 1
    with pytest.raises(StaleShareError) as info:
        server.receive_shares(old_round_keys)
    assert isinstance(info.value, ShareError) and isinstance(info.value, ReplayError)
    for keys in fresh.values():
        server.receive_shares(keys)
    deliveries = server.close_shares()
    with pytest.raises(StaleShareError):
        members["cloud0"].receive_shares(old_deliveries["cloud0"])
    spliced = dataclasses.replace(
        deliveries["cloud0"],
        ciphertexts={**deliveries["cloud0"].ciphertexts, "cloud1": old_deliveries["cloud0"].ciphertexts["cloud1"]},
    )
    with pytest.raises(ShareError):  # right round on the outside, an old round's box inside
        members["cloud0"].receive_shares(spliced)
    confirmations = confirm_all(server, members, mask_all(server, members, deliveries, inputs))
    with pytest.raises(StaleRoundError):
        members["cloud0"].reveal(dataclasses.replace(confirmations, round_id=1))
    reveal = members["cloud0"].reveal(confirmations)
    with pytest.raises(StaleShareError):
        server.receive_reveal(dataclasses.replace(reveal, round_id=1))
    with pytest.raises(StaleRoundError):
        server.receive_masked(dataclasses.replace(server.transcript.masked[0], round_id=1))


def test_a_request_to_reveal_both_secrets_of_one_member_is_refused() -> None:
    job, numel = Job.of(3), 100
    inputs = encoded_inputs(job.names, numel)
    server, members = job.round(2, numel)
    deliveries = to_shares(server, members)
    honest = mask_all(server, members, deliveries, inputs)
    greedy = UnmaskRequest(round_id=honest.round_id, survivors=honest.survivors, dropped=("cloud2",))
    with pytest.raises(RevealRefused):
        members["cloud0"].confirm(greedy)
    assert members["cloud0"].phase is Phase.FAILED
    with pytest.raises(SecAggProtocolError):  # one request per round, and this member is done
        members["cloud0"].confirm(honest)
    server.receive_confirm(members["cloud1"].confirm(honest))
    with pytest.raises(SecAggProtocolError):  # signed one request already
        members["cloud1"].confirm(UnmaskRequest(round_id=honest.round_id, survivors=honest.survivors[1:], dropped=()))
    server.receive_confirm(members["cloud2"].confirm(honest))
    confirmations = server.close_confirms()
    members["cloud1"].reveal(confirmations)
    with pytest.raises(SecAggProtocolError):  # answered once already
        members["cloud1"].reveal(confirmations)


def test_recompute_sum_of_the_recorded_transcript_equals_the_live_result() -> None:
    job, numel = Job.of(4), 1000
    inputs = encoded_inputs(job.names, numel)
    server, members = job.round(3, numel)
    live = run(server, members, inputs, skip_mask=["cloud3"])
    recorded = msgpack.packb(server.transcript.to_wire(), use_bin_type=True)
    transcript = Transcript.from_wire(msgpack.unpackb(recorded, raw=False))
    np.testing.assert_array_equal(recompute_sum(transcript, job.verify), live)
    masked = transcript.masked[0]
    flipped = dataclasses.replace(masked, y=bytes([masked.y[0] ^ 1]) + masked.y[1:])
    forged = dataclasses.replace(transcript, masked=(flipped, *transcript.masked[1:]))
    with pytest.raises(AuthenticationError):
        recompute_sum(forged, job.verify)


def test_sparse_rounds_mask_the_agreed_coordinates_only() -> None:
    job, numel, k = Job.of(3), 50_000, 2_000
    seed = bytes(range(32))
    idx = random_k_indices(seed, numel, k)
    rng = np.random.default_rng(3)
    dense = {m: rng.normal(0, 0.1, numel).astype(np.float32) for m in job.names}
    inputs = {m: FP.encode(gather(x, idx)) for m, x in dense.items()}
    total = scatter(FP.decode(run(*job.round(2, k), inputs)), idx, numel)
    expected = np.zeros(numel)
    expected[idx] = sum(x[idx].astype(np.float64) for x in dense.values())
    np.testing.assert_allclose(total, expected, rtol=0, atol=3 / FP.scale)
