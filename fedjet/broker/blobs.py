"""Blobs larger than the server's ``max_payload``: chunked publish and bounded reassembly.

Every blob travels as ``n`` chunk messages on one subject, each with ``Nats-Msg-Id =
<blob>:<i>`` (so a re-sent chunk is dropped by JetStream dedup) and headers naming the blob,
the part ``i/n`` and the total size. Chunks are published with a bounded window of async
publishes rather than one round trip each. A blob is complete at the stream sequence of its
last chunk: that sequence is its place in the total order the coordinator and replay follow.

The chunk format is :mod:`~fedjet.broker.chunks`, publishing :mod:`~fedjet.broker.blob_publish`,
reassembly :mod:`~fedjet.broker.blob_assembly`; this module is the one import for all three.
"""

from __future__ import annotations

from fedjet.broker.blob_assembly import Blob, BlobAssembler, BlobSink, Evicted, SinkFactory
from fedjet.broker.blob_publish import PUBLISH_ATTEMPTS, PUBLISH_WINDOW_BYTES, LazyPayload, PublishedBlob, publish_blob
from fedjet.broker.chunks import (
    H_BLOB,
    H_PART,
    H_SIZE,
    HEADER_ROOM,
    MAX_CHUNKS_PER_SUBJECT,
    MSG_ID,
    BlobKey,
    chunk_size_for,
    header_bytes,
    parse_chunk_headers,
    part_index,
)

__all__ = [
    "HEADER_ROOM",
    "H_BLOB",
    "H_PART",
    "H_SIZE",
    "MAX_CHUNKS_PER_SUBJECT",
    "MSG_ID",
    "PUBLISH_ATTEMPTS",
    "PUBLISH_WINDOW_BYTES",
    "Blob",
    "BlobAssembler",
    "BlobKey",
    "BlobSink",
    "Evicted",
    "LazyPayload",
    "PublishedBlob",
    "SinkFactory",
    "chunk_size_for",
    "header_bytes",
    "parse_chunk_headers",
    "part_index",
    "publish_blob",
]
