"""Bytes and time of one secure-aggregation round against the same round in the clear.

Not a test: numbers for the README. ``python -m fedjet.secagg.bench`` prints a few sizes.
Plain means each member sends its float32 update and the coordinator sums them; secure
means the whole protocol, fixed-point encoding included, with messages packed as msgpack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]
import numpy as np
from nacl.signing import SigningKey

from fedjet.secagg.fixedpoint import FixedPoint
from fedjet.secagg.messages import RoundConfig
from fedjet.secagg.protocol import MemberRound, ServerRound

T = TypeVar("T")


class _Meter:
    """Wall time per party and bytes per direction, accumulated over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.up = 0
        self.down = 0

    def time(self, who: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[who] = self.seconds.get(who, 0.0) + time.perf_counter() - start
        return out

    @staticmethod
    def size(msg: Any) -> int:
        return len(msgpack.packb(msg.to_wire(), use_bin_type=True))


def _plain(updates: dict[str, np.ndarray]) -> tuple[float, float, int]:
    """(seconds per member, server seconds, bytes per member) without secure aggregation."""
    start = time.perf_counter()
    frames = {m: msgpack.packb({"x": x.tobytes()}, use_bin_type=True) for m, x in updates.items()}
    member_s = (time.perf_counter() - start) / len(updates)
    start = time.perf_counter()
    total = np.zeros(next(iter(updates.values())).shape, dtype=np.float32)
    for frame in frames.values():
        total += np.frombuffer(msgpack.unpackb(frame)["x"], dtype=np.float32)
    return member_s, time.perf_counter() - start, len(next(iter(frames.values())))


def _secure(updates: dict[str, np.ndarray], threshold: int, dropped: int, meter: _Meter) -> None:
    names = tuple(sorted(updates))
    numel = len(next(iter(updates.values())))
    signing = {m: SigningKey.generate() for m in names}
    verify = {m: k.verify_key for m, k in signing.items()}
    cfg = RoundConfig(job="bench", round_id=1, threshold=threshold, members=names, numel=numel)
    server = ServerRound(config=cfg, verify_keys=verify)
    members = {m: MemberRound(config=cfg, member=m, signing_key=signing[m], verify_keys=verify) for m in names}
    fp = FixedPoint()
    for m, member in members.items():
        advert = meter.time(m, member.advertise)
        meter.up += meter.size(advert)
        meter.time("server", server.receive_advert, advert)
    adverts = meter.time("server", server.close_adverts)
    for m, member in members.items():
        meter.down += meter.size(adverts)
        keys = meter.time(m, member.share_keys, adverts)
        meter.up += meter.size(keys)
        meter.time("server", server.receive_shares, keys)
    deliveries = meter.time("server", server.close_shares)
    for m in names[dropped:]:
        meter.down += meter.size(deliveries[m])
        meter.time(m, members[m].receive_shares, deliveries[m])
        masked = meter.time(m, members[m].mask, meter.time(m, fp.encode, updates[m]))
        meter.up += meter.size(masked)
        meter.time("server", server.receive_masked, masked)
    request = meter.time("server", server.close_masked)
    for m in request.survivors:
        meter.down += meter.size(request)
        confirm = meter.time(m, members[m].confirm, request)
        meter.up += meter.size(confirm)
        meter.time("server", server.receive_confirm, confirm)
    confirmations = meter.time("server", server.close_confirms)
    for m in request.survivors:
        meter.down += meter.size(confirmations)
        reveal = meter.time(m, members[m].reveal, confirmations)
        meter.up += meter.size(reveal)
        meter.time("server", server.receive_reveal, reveal)
    meter.time("server", server.finish)


def overhead(n_members: int, numel: int, *, dropped: int = 0, seed: int = 0) -> dict[str, Any]:
    """Per-member bytes and seconds of a secure round vs plain; ``dropped`` members skip masking."""
    rng = np.random.default_rng(seed)
    updates = {f"m{i:03d}": rng.normal(0, 0.01, numel).astype(np.float32) for i in range(n_members)}
    threshold = n_members // 2 + 1
    plain_member_s, plain_server_s, plain_bytes = _plain(updates)
    meter = _Meter()
    _secure(updates, threshold, dropped, meter)
    member_s = [meter.seconds[m] for m in sorted(updates)[dropped:]]  # members that masked
    return {
        "n_members": n_members,
        "numel": numel,
        "threshold": threshold,
        "dropped": dropped,
        "plain_bytes_per_member": plain_bytes,
        "secagg_up_bytes_per_member": meter.up / n_members,
        "secagg_down_bytes_per_member": meter.down / n_members,
        "byte_overhead": meter.up / ((n_members - dropped) * plain_bytes),  # vs plain with the same dropouts
        "plain_member_s": plain_member_s,
        "secagg_member_s": sum(member_s) / len(member_s),
        "plain_server_s": plain_server_s,
        "secagg_server_s": meter.seconds["server"],
    }


def main() -> None:
    for n, numel, dropped in ((3, 10**6, 0), (3, 10**6, 1), (10, 10**6, 0), (10, 10**6, 3), (3, 10**7, 0)):
        print(json.dumps(overhead(n, numel, dropped=dropped)))


if __name__ == "__main__":
    main()
