"""Secure aggregation against an actively malicious coordinator (issue items 5 and 8).

A scripted coordinator, following no rule, talks over a real nats-server to the worker's own
``SecureMember`` objects (the same class and code path ``fedjet worker`` runs):

* it hands out weights 1, 0, 0 so that the "sum" would be one member's update: members weigh
  themselves, and the unmasked sum is the members' own sample-weighted average;
* with 5 members and threshold 3 it withholds share deliveries so one member masks against two
  peers only, then tells different members different survivor lists, aiming at that member's
  self-mask seed and its peers' mask keys: no member reveals anything.

Also: the transcript's blob id is random and a pre-published id no longer hijacks the record; a
chunk JetStream acks as a duplicate is an error. A masked contribution no clipped input can make
is refused in ``test_secagg_range.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from nacl.signing import SigningKey

from fedjet.broker.blobs import publish_blob
from fedjet.broker.jetstream import close_quietly, connect, ensure_job_streams
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.secagg import SecAggLink, secagg_max_bytes
from fedjet.codecs.crypto import COORDINATOR, seal_secagg
from fedjet.codecs.flat import flatten
from fedjet.codecs.messages import UpdateHeader
from fedjet.codecs.record import SecureRecord
from fedjet.config.secure_agg import SecureAggConfig
from fedjet.coordinator.secure_sum import read_transcript_blob, recorded_average, transcript_blob_id
from fedjet.errors import BlobError, ValidationError
from fedjet.secagg import (
    Advertise,
    AdvertiseList,
    Confirm,
    Confirmations,
    FixedPoint,
    MaskedInput,
    MemberRound,
    Reveal,
    RevealRefused,
    RoundConfig,
    ServerRound,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    Weight,
    average,
)
from fedjet.secagg.steps import Step, round_id
from fedjet.worker.secure import SecureMember
from tests.conftest import make_parties

BASE_HASH = "base-hash-of-version-0"
NUMEL = 300
PHASE_S = 10.0  # the script's own bound on a phase every member answers at once


def member_update(cloud: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(map(ord, cloud)))
    return {"w": 0.1 * torch.randn(NUMEL, generator=gen)}


class Script:
    """The coordinator's end of the secure-aggregation channel, driven by hand."""

    def __init__(self, link: SecAggLink, rid: int, verify_keys: Mapping[str, Any]) -> None:
        self.link, self.rid, self.verify_keys = link, rid, dict(verify_keys)
        self.seen: list[tuple[str, Step]] = []  # every step that arrived, in order

    async def send(self, to: str, kind: str, body: Mapping[str, Any] | None = None, **extra: Any) -> None:
        step = Step(kind=kind, round_id=self.rid, base_version=0, body=dict(body or {}), extra=extra)
        await self.link.send(to, step)

    async def take(self, kind: str, expect: Iterable[str], within: float = PHASE_S) -> dict[str, Step]:
        """``kind`` steps of this round until every member in ``expect`` sent one, or ``within`` s."""
        want, got = set(expect), {}
        deadline = time.monotonic() + within
        while want - set(got) and time.monotonic() < deadline:
            arrived = await self.link.receive(0.2)
            if arrived is None:
                continue
            self.seen.append((arrived.sender, arrived.step))
            if arrived.step.kind == kind and arrived.step.round_id == self.rid:
                got[arrived.sender] = arrived.step
        return got

    def steps_of(self, kind: str) -> list[tuple[str, Step]]:
        return [(sender, step) for sender, step in self.seen if step.kind == kind]


@contextlib.asynccontextmanager
async def members_and_script(
    nats_url: str, job: str, clouds: tuple[str, ...], threshold: int
) -> AsyncIterator[tuple[Script, list[Any], asyncio.Event, dict[str, SecureMember]]]:
    """Real ``SecureMember``s contributing their updates, and a scripted coordinator's link."""
    coord, parties = make_parties(clouds)
    nc = await connect(nats_url, "malicious")
    js = nc.jetstream()
    subjects = JobSubjects(job)
    await ensure_job_streams(js, subjects, secure_agg=True)
    max_bytes = secagg_max_bytes(len(clouds), NUMEL)
    script_link = SecAggLink(js, subjects, coord, peers=clouds, max_bytes=max_bytes, max_payload=nc.max_payload)
    await script_link.start()
    links, secure, work = [script_link], {}, []
    over = asyncio.Event()
    config = SecureAggConfig(threshold=threshold, timeout_s=1.0)
    verify_keys = {c: parties[c].me.sign.verify_key for c in clouds}  # each member's own copy
    try:
        for cloud in clouds:
            link = SecAggLink(js, subjects, parties[cloud], peers=(COORDINATOR,), max_bytes=max_bytes,
                              max_payload=nc.max_payload)  # fmt: skip
            await link.start()
            links.append(link)
            secure[cloud] = SecureMember(link, job=job, cloud=cloud, clouds=clouds, config=config,
                                         signing_key=parties[cloud].me.sign, verify_keys=verify_keys)  # fmt: skip
            header = UpdateHeader(job=job, cloud=cloud, worker="0", seq=1, base_version=0,
                                  samples=10 * (1 + clouds.index(cloud)), loss=2.0)  # fmt: skip
            work.append(asyncio.ensure_future(secure[cloud].contribute(member_update(cloud), header, BASE_HASH,
                                                                        over.is_set)))  # fmt: skip
        yield Script(script_link, round_id(0, 1), verify_keys), work, over, secure
    finally:
        over.set()
        await asyncio.wait_for(asyncio.gather(*work, return_exceptions=True), 30)
        for link in links:
            await link.stop()
        await close_quietly(nc)


async def open_round(script: Script, clouds: tuple[str, ...], threshold: int) -> dict[str, Advertise]:
    for cloud in clouds:
        await script.send(cloud, "open", members=list(clouds), threshold=threshold, numel=NUMEL, base_hash=BASE_HASH)
    adverts = await script.take("advertise", clouds)
    assert set(adverts) == set(clouds), f"only {sorted(adverts)} advertised"
    return {c: Advertise.from_wire(s.body) for c, s in adverts.items()}


# --- (a) coordinator-chosen weights --------------------------------------------------------------


def test_weights_one_zero_zero_from_the_coordinator_do_not_single_out_a_member(nats_url):
    """The old protocol masked w_i * x_i with the coordinator's w_i: weights 1, 0, 0 made the
    unmasked "sum" aws's update. Now each member weighs itself by its own sample count and signs
    it; the unmasked sum is their sample-weighted average whatever the coordinator sent."""
    clouds = ("aws", "azure", "gcp")
    job = "sa-weights"
    fp = FixedPoint.for_job(SecureAggConfig())

    async def scenario():
        async with members_and_script(nats_url, job, clouds, 2) as (script, work, over, _):
            rc = RoundConfig(job=job, round_id=script.rid, threshold=2, members=clouds, numel=NUMEL)
            adverts = await open_round(script, clouds, 2)
            server = ServerRound(config=rc, verify_keys=script.verify_keys)  # the honest steps, by the book
            for advert in adverts.values():
                server.receive_advert(advert)
            listing = server.close_adverts()
            attack = {"aws": 1.0, "azure": 0.0, "gcp": 0.0}
            for cloud in clouds:
                await script.send(cloud, "adverts", listing.to_wire(), weights=attack)
            for step in (await script.take("shares", clouds)).values():
                server.receive_shares(ShareKeys.from_wire(step.body))
            for cloud, delivery in server.close_shares().items():
                await script.send(cloud, "deliver", delivery.to_wire())
            for step in (await script.take("masked", clouds)).values():
                server.receive_masked(MaskedInput.from_wire(step.body))
            request = server.close_masked()
            for cloud in clouds:
                await script.send(cloud, "unmask", request.to_wire())
            for step in (await script.take("confirm", clouds)).values():
                server.receive_confirm(Confirm.from_wire(step.body))
            confirmations = server.close_confirms()
            for cloud in server.confirmed:
                await script.send(cloud, "confirmed", confirmations.to_wire())
            for step in (await script.take("reveal", clouds)).values():
                server.receive_reveal(Reveal.from_wire(step.body))
            total = server.finish()
            over.set()
            done = await asyncio.wait_for(asyncio.gather(*work), 30)
            return server.transcript, total, adverts, done

    transcript, total, adverts, done = asyncio.run(scenario())
    assert done == [True, True, True]
    samples = {c: 10 * (1 + clouds.index(c)) for c in clouds}
    assert {c: (a.weight, a.units) for c, a in adverts.items()} == {c: (n, n) for c, n in samples.items()}
    x = {c: flatten(member_update(c)).astype(np.float64) for c in clouds}
    as_the_attack_meant = total.view(np.int64) / fp.scale  # what weights 1, 0, 0 would have made: aws's update
    assert np.abs(as_the_attack_meant - x["aws"]).max() > 1.0, "the unmasked sum is aws's update alone"
    expected = sum(samples[c] * x[c] for c in clouds) / sum(samples.values())
    np.testing.assert_allclose(average(transcript, total, fp), expected, rtol=0, atol=1e-5)

    # replay divides by what the members signed; the record's weights are only the coordinator's word
    config = SecureAggConfig()
    honest = SecureRecord(round_id=transcript.config.round_id, numel=NUMEL, survivors=clouds,
                          weights={c: n / sum(samples.values()) for c, n in samples.items()})  # fmt: skip
    np.testing.assert_allclose(recorded_average(transcript, honest, config), expected, rtol=0, atol=1e-5)
    lying = dataclasses.replace(honest, weights={"aws": 1.0, "azure": 0.0, "gcp": 0.0})
    with pytest.raises(ValidationError, match="signed"):
        recorded_average(transcript, lying, config)


# --- (b) withheld deliveries and different survivor lists -----------------------------------


def test_withheld_shares_and_different_survivor_lists_get_no_member_to_reveal(nats_url):
    """5 members, threshold 3. The coordinator delivers to u (c0) only the shares of a and b (c1,
    c2), so u masks against them alone, then asks c and d (c3, c4) to unmask with survivors
    {c, d, u} and dropped {a, b}, b with survivors {b, c, d, u} and dropped {a}, a with
    survivors {a, c, d, u} and dropped {b}, and u with survivors {u, a, b}: answered as before
    (each member once, never both secrets of one member), that is 5 shares of u's self-mask
    seed, 3 of a's and 3 of b's mask keys, so u's input unmasked exactly. Now every member signs the
    request it got, and none holds T signatures on its own request together with every
    survivor's statement that it masked against that request's members: nobody reveals."""
    clouds = ("c0", "c1", "c2", "c3", "c4")
    u, a, b, c, d = clouds
    job = "sa-isolate"

    async def scenario():
        async with members_and_script(nats_url, job, clouds, 3) as (script, work, over, secure):
            adverts = await open_round(script, clouds, 3)
            listing = AdvertiseList(round_id=script.rid, adverts=tuple(adverts[m] for m in clouds))
            for cloud in clouds:
                await script.send(cloud, "adverts", listing.to_wire())
            shares = {m: ShareKeys.from_wire(s.body) for m, s in (await script.take("shares", clouds)).items()}
            assert set(shares) == set(clouds)
            for v in clouds:
                senders = (a, b) if v == u else [s for s in clouds if s != v]
                delivery = ShareDelivery(round_id=script.rid, recipient=v,
                                         ciphertexts={s: shares[s].ciphertexts[v] for s in senders})  # fmt: skip
                await script.send(v, "deliver", delivery.to_wire())
            masked = {m: MaskedInput.from_wire(s.body) for m, s in (await script.take("masked", clouds)).items()}
            assert set(masked) == set(clouds)
            requests = {
                c: UnmaskRequest(round_id=script.rid, survivors=(u, c, d), dropped=(a, b)),
                d: UnmaskRequest(round_id=script.rid, survivors=(u, c, d), dropped=(a, b)),
                b: UnmaskRequest(round_id=script.rid, survivors=(u, b, c, d), dropped=(a,)),
                u: UnmaskRequest(round_id=script.rid, survivors=(u, a, b), dropped=()),
                a: UnmaskRequest(round_id=script.rid, survivors=(u, a, c, d), dropped=(b,)),
            }
            for member, request in requests.items():
                await script.send(member, "unmask", request.to_wire())
            confirms = await script.take("confirm", clouds, within=1.5)  # members wait 2 s for what follows
            confirms = {m: Confirm.from_wire(s.body) for m, s in confirms.items()}
            # the most a coordinator can hand over: every signature and statement it holds
            everything = Confirmations(round_id=script.rid, confirms=tuple(confirms.values()),
                                       statements=tuple(m.statement for m in masked.values()))  # fmt: skip
            for member in confirms:
                await script.send(member, "confirmed", everything.to_wire())
            await script.take("reveal", clouds, within=4.0)
            over.set()
            done = await asyncio.wait_for(asyncio.gather(*work), 30)
            return script, masked, confirms, done, {m: s.rounds_failed for m, s in secure.items()}

    script, masked, confirms, done, failed = asyncio.run(scenario())
    assert masked[u].peers == (u, a, b), "the attack did not shrink u's peers"
    assert masked[c].peers == clouds
    assert set(confirms) == set(clouds)  # each signed the one request it was sent...
    reveals = [Reveal.from_wire(step.body) for _, step in script.steps_of("reveal")]
    assert reveals == [], f"{[r.member for r in reveals]} revealed shares"  # ...and none revealed
    b_of_u = sum(u in r.b_shares for r in reveals)
    keys_of_peers = min(sum(p in r.s_shares for r in reveals) for p in (a, b))
    assert b_of_u < 3 or keys_of_peers < 3  # never T shares of u's seed and of all its peers' keys
    assert done == [False] * 5 and all(n >= 1 for n in failed.values())


def test_t_signatures_are_not_enough_while_a_survivor_masked_against_other_members():
    """Defence in depth: three members with full views sign ({u, a, b, c}, {d}) while u, whose
    share from d was withheld, masked against a, b and c only. T signatures are there, but u's
    signed statement of whom it masked against does not match the request: nobody reveals.
    (With T > n/2 and every member checking that at least T members shared with it, T
    signatures alone already rule out isolating a member; this check makes the request's
    meaning exact.) With u's share delivered, the same request is answered."""
    names = tuple(f"m{i}" for i in range(5))
    u, a, b, c, d = names
    signing = {m: SigningKey.generate() for m in names}
    verify = {m: k.verify_key for m, k in signing.items()}

    def attempt(withhold: bool) -> list[Reveal]:
        rc = RoundConfig(job="job", round_id=9, threshold=3, members=names, numel=16)
        members = {m: MemberRound(config=rc, member=m, signing_key=signing[m], verify_keys=verify) for m in names}
        listing = AdvertiseList(round_id=9, adverts=tuple(members[m].advertise() for m in names))
        shares = {m: members[m].share_keys(listing) for m in names}
        masked = {}
        for v in names:
            senders = [s for s in names if s != v and not (withhold and v == u and s == d)]
            sealed = {s: shares[s].ciphertexts[v] for s in senders}
            members[v].receive_shares(ShareDelivery(round_id=9, recipient=v, ciphertexts=sealed))
            masked[v] = members[v].mask(FixedPoint().encode(np.full(16, 0.1)))
        request = UnmaskRequest(round_id=9, survivors=(u, a, b, c), dropped=(d,))
        confirms = [members[m].confirm(request) for m in (a, b, c)]
        everything = Confirmations(round_id=9, confirms=tuple(confirms),
                                   statements=tuple(m.statement for m in masked.values()))  # fmt: skip
        out = []
        for m in (a, b, c):
            try:
                out.append(members[m].reveal(everything))
            except RevealRefused as e:
                assert "masked against other members" in str(e)
        return out

    assert attempt(withhold=True) == []
    assert len(attempt(withhold=False)) == 3


# --- transcript ids and duplicate acks -----------------------------------------------------------


def test_transcript_ids_are_random_and_a_pre_published_id_does_not_hijack_the_record(nats_url):
    """A member knows the round id while the round runs; it used to know the transcript's blob
    id too (``transcript-<round>``) and could publish a chunk under it first: JetStream then
    dropped the coordinator's copy as a duplicate and the record pointed at the member's junk,
    so replay failed. Now the id is random, the record's range leads to the real transcript, and
    publishing under an id someone already used is an error, not a success."""
    job, rid = "sa-ids", round_id(4, 77)
    ids = {transcript_blob_id(rid) for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith(f"transcript-{rid}-") and len(i) > 40 for i in ids)
    coord, _ = make_parties(("aws",))

    async def scenario():
        nc = await connect(nats_url, "ids")
        try:
            js = nc.jetstream()
            subjects = JobSubjects(job)
            await ensure_job_streams(js, subjects, secure_agg=True)
            for junk in (f"transcript-{rid}", f"transcript-{rid}-0", "transcript"):  # what a member could guess
                await publish_blob(js, subjects.secagg_transcript, b"junk", blob_id=junk, max_payload=nc.max_payload)
            sealed = seal_secagg(msgpack.packb({"the": "transcript"}), coord, COORDINATOR)
            blob = await publish_blob(js, subjects.secagg_transcript, sealed, blob_id=transcript_blob_id(rid),
                                      max_payload=nc.max_payload)  # fmt: skip
            record = SecureRecord(round_id=rid, numel=1, survivors=("aws",), transcript_first=blob.first_seq,
                                  transcript_last=blob.last_seq)  # fmt: skip
            read = await read_transcript_blob(js, subjects, record, 1 << 20)
            elsewhere = dataclasses.replace(record, transcript_first=1, transcript_last=1)
            with pytest.raises(ValidationError, match="no transcript"):
                await read_transcript_blob(js, subjects, elsewhere, 1 << 20)
            with pytest.raises(BlobError, match="already stored"):  # the old predictable id, taken first
                await publish_blob(js, subjects.secagg_transcript, sealed, blob_id=f"transcript-{rid}",
                                   max_payload=nc.max_payload, refuse_duplicate=True)  # fmt: skip
            return sealed, read
        finally:
            await close_quietly(nc)

    sealed, read = asyncio.run(scenario())
    assert read == sealed


def test_a_duplicate_ack_is_an_error_where_refused_and_a_fresh_id_goes_through(nats_url):
    job = "sa-dup"

    async def scenario():
        nc = await connect(nats_url, "dup")
        try:
            js = nc.jetstream()
            subjects = JobSubjects(job)
            await ensure_job_streams(js, subjects, secure_agg=True)
            first = await publish_blob(js, subjects.secagg_transcript, b"x" * 10, blob_id="same",
                                       max_payload=nc.max_payload)  # fmt: skip
            with pytest.raises(BlobError, match="duplicate"):
                await publish_blob(js, subjects.secagg_transcript, b"y" * 10, blob_id="same",
                                   max_payload=nc.max_payload, refuse_duplicate=True)  # fmt: skip
            resent = await publish_blob(js, subjects.secagg_transcript, b"x" * 10, blob_id="same",
                                        max_payload=nc.max_payload)  # fmt: skip
            assert resent.duplicate and resent.first_seq == first.first_seq  # plain dedup, for who asks for it
            other = await publish_blob(js, subjects.secagg_transcript, b"y" * 10, blob_id="other",
                                       max_payload=nc.max_payload)  # fmt: skip
            return first, other
        finally:
            await close_quietly(nc)

    first, other = asyncio.run(scenario())
    assert other.first_seq > first.last_seq and not first.duplicate and not other.duplicate


def test_what_the_coordinator_still_controls_cannot_zero_a_weight():
    """The round's base (FedBuff's tau) is the coordinator's word: it can only make an update
    look staler, down to s(max_staleness) > 0, never weigh it 0; beyond, the member refuses.
    Sample-weighted rounds take no coordinator input at all."""
    from fedjet.config.job import Staleness
    from fedjet.secagg import SecAggProtocolError, WeightRule

    rule = WeightRule(max_weight=1 << 40, staleness=Staleness(), max_staleness=8)
    weights = [rule.of(samples=1, tau=t) for t in range(9)]
    assert weights[0] == Weight(1 << 16, 1 << 16) and all(w.weight >= (1 << 16) // 3 for w in weights)
    with pytest.raises(SecAggProtocolError):
        rule.of(samples=1, tau=9)
    by_samples = WeightRule(max_weight=1000)
    assert by_samples.of(samples=40, tau=0) == Weight(40, 40)
    assert by_samples.of(samples=10**9, tau=0) == Weight(1000, 1000)  # capped: the ring cannot overflow
    with pytest.raises(SecAggProtocolError):
        by_samples.of(samples=40, tau=1)
