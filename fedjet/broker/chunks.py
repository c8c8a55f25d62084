"""The chunk format of a blob: the headers every chunk carries and the sizes they imply.

A blob of ``size`` bytes travels as ``n`` chunk messages on one subject, each with
``Nats-Msg-Id = <blob>:<i>`` and headers naming the blob, the part ``i/n`` and the total size.
"""

from __future__ import annotations

import math

from fedjet.errors import BlobError, BrokerError

H_BLOB = "Fedjet-Blob"
H_PART = "Fedjet-Part"
H_SIZE = "Fedjet-Size"
MSG_ID = "Nats-Msg-Id"
HEADER_ROOM = 2048  # bytes kept free in each message for headers
MAX_CHUNKS_PER_SUBJECT = 4096  # chunks one subject may hold in partial blobs (4 GiB at 1 MiB each)


def chunk_size_for(max_payload: int) -> int:
    if max_payload <= HEADER_ROOM * 2:
        raise BrokerError(f"server max_payload {max_payload} is too small for fedjet chunks")
    return max_payload - HEADER_ROOM


BlobKey = tuple[str, str]  # (subject, blob id)


def header_bytes(headers: dict[str, str] | None) -> int:
    """Size of the NATS header block as sent on the wire."""
    if not headers:
        return 0
    return len("NATS/1.0\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + 2


def part_index(headers: dict[str, str] | None) -> int | None:
    """The chunk index ``i`` of a ``Fedjet-Part: i/n`` header, or None when it is unreadable."""
    try:
        return int((headers or {}).get(H_PART, "").split("/", 1)[0])
    except ValueError:
        return None


def parse_chunk_headers(
    headers: dict[str, str] | None, max_blob_bytes: int, min_chunk_bytes: int = 1
) -> tuple[str, int, int, int]:
    """(blob id, index, count, total size), validated before anything is allocated. A blob
    of ``size`` bytes has at most ``ceil(size / min_chunk_bytes)`` chunks (publishers fill
    each chunk to the server's payload size), which bounds the messages it can hold up."""
    if not headers or H_BLOB not in headers or H_PART not in headers or H_SIZE not in headers:
        raise BlobError("message is not a fedjet chunk (missing Fedjet-Blob/Part/Size headers)")
    blob_id = headers[H_BLOB]
    try:
        index_text, count_text = headers[H_PART].split("/", 1)
        index, count, size = int(index_text), int(count_text), int(headers[H_SIZE])
    except ValueError as e:
        raise BlobError(f"bad chunk headers {headers.get(H_PART)!r:.40}/{headers.get(H_SIZE)!r:.40}") from e
    if not 0 < len(blob_id) <= 256:
        raise BlobError("blob id must be 1..256 characters")
    if size < 0 or size > max_blob_bytes:
        raise BlobError(f"blob {blob_id[:64]} declares {size} bytes > limit {max_blob_bytes}")
    if count < 1 or not 0 <= index < count or count > max(1, math.ceil(size / min_chunk_bytes)):
        raise BlobError(f"blob {blob_id[:64]} declares part {index}/{count} of {size} bytes")
    return blob_id, index, count, size


def chunk_len(size: int, count: int, index: int) -> int:
    """Bytes of chunk ``index`` of ``count`` in a blob of ``size``: what a publisher cuts."""
    if size == 0:
        return 0
    step = math.ceil(size / count)
    return max(0, min(size, (index + 1) * step) - index * step)
