"""The coordinator's record of one global version: who contributed what, and its progress.

It travels encrypted inside the version's signed head; the observer builds the report from
it, ``fedjet replay`` re-applies the batches it lists, and a restarted coordinator resumes from
its progress fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fedjet.codecs.messages import Update
from fedjet.coordinator.strategies import Applied


@dataclass
class Received:
    """A decoded, validated update waiting in a batch, with the messages to ack later."""

    update: Update
    applied: Applied
    stream_seq: int
    wire_bytes: int
    msgs: list[Any]


def contribution(r: Received) -> dict[str, Any]:
    h = r.update.header
    return {
        "cloud": h.cloud,
        "worker": h.worker,
        "seq": h.seq,
        "stream_seq": r.stream_seq,
        "base": h.base_version,
        "staleness": r.applied.staleness,
        "samples": h.samples,
        "loss": h.loss,
        "wire_bytes": r.wire_bytes,
        "tokens": h.tokens,
        "compute_s": h.compute_s,
    }


def version_record(strategy: str, received: list[Received], **extra: Any) -> dict[str, Any]:
    """The record of a version made from ``received`` (in the order they were folded)."""
    samples = sum(r.update.header.samples for r in received)
    loss = sum(r.update.header.loss * r.update.header.samples for r in received)
    return {
        "strategy": strategy,
        "contributions": [contribution(r) for r in received],
        "train_loss": loss / samples if samples else None,
        "bytes_up": sum(r.wire_bytes for r in received),
        "published_unix": time.time(),
        **extra,
    }
