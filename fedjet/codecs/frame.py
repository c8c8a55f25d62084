"""msgpack frames with a versioned header, parsed under hard size limits.

A frame is ``{"fv": FORMAT_VERSION, "type": ..., "header": {...}, "tensors": [...]}``. Unknown
header keys are ignored (newer senders stay readable); an unknown format version is a
``SchemaError``. Every malformed input ends in a ``CodecError`` subclass.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from fedjet.errors import DecodeError, LimitError, SchemaError

FORMAT_VERSION = 1
FRAME_TYPES = ("update", "global")
FRAME_FACTOR = 2  # x the dense float32 size of the model
FRAME_HEADROOM = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Upper bounds checked before allocating; a frame beyond any of them is rejected."""

    max_frame_bytes: int = 1 << 30
    max_tensors: int = 4096
    max_elements: int = 1 << 28  # per tensor
    max_total_elements: int = 1 << 30

    @classmethod
    def for_model(cls, numel: int, tensors: int = 4096) -> Limits:
        """Limits for a model of ``numel`` parameters: a frame may hold at most twice its dense
        float32 size plus 1 MiB (names, shapes, scales), and no more elements than it has."""
        if numel < 1 or tensors < 1:
            raise LimitError(f"a model needs parameters and tensors, got {numel} and {tensors}")
        return cls(
            max_frame_bytes=FRAME_FACTOR * 4 * numel + FRAME_HEADROOM,
            max_tensors=max(tensors, 1),
            max_elements=numel,
            max_total_elements=numel,
        )


def pack_frame(frame_type: str, header: dict[str, Any], tensors: list[dict[str, Any]]) -> bytes:
    return bytes(pack_frame_view(frame_type, header, tensors))


def pack_frame_view(frame_type: str, header: dict[str, Any], tensors: list[dict[str, Any]]) -> memoryview:
    """:func:`pack_frame`'s bytes as a view of the packer's own buffer: a whole-model frame
    is built once, not built and then copied out (entries may hold views of the tensors)."""
    if frame_type not in FRAME_TYPES:
        raise SchemaError(f"unknown frame type {frame_type!r}")
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack({"fv": FORMAT_VERSION, "type": frame_type, "header": header, "tensors": tensors})
    view: memoryview = packer.getbuffer()
    return view


PIECE_MIN = 1 << 16  # values this big stay views of their tensor in a frame's pieces


class FramePieces:
    """A frame as the pieces it is made of: msgpack bytes for the names, shapes and header, and
    views of the tensors' own memory for their values. Its bytes are :func:`pack_frame`'s, read
    range by range, so a whole-model frame is never built: a version is sealed and published
    piece by piece. The tensors must not change while it is read."""

    def __init__(self, pieces: list[bytes | bytearray | memoryview]) -> None:
        self._pieces = [memoryview(p).cast("B") for p in pieces if len(p)]
        self._ends = list(itertools.accumulate(len(p) for p in self._pieces))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def read_into(self, start: int, out: memoryview) -> None:
        """Bytes ``[start, start + len(out))`` copied into ``out``."""
        if start < 0 or start + len(out) > len(self):
            raise ValueError(f"range {start}+{len(out)} outside a frame of {len(self)} bytes")
        at, i = 0, bisect.bisect_right(self._ends, start)
        while at < len(out):
            piece_start = self._ends[i] - len(self._pieces[i])
            lo = start + at - piece_start
            take = min(len(self._pieces[i]) - lo, len(out) - at)
            out[at : at + take] = self._pieces[i][lo : lo + take]
            at, i = at + take, i + 1

    def read(self, start: int, end: int) -> bytearray:
        out = bytearray(max(0, min(end, len(self)) - start))
        self.read_into(start, memoryview(out))
        return out

    def __bytes__(self) -> bytes:
        return b"".join(self._pieces)


def _bin_header(size: int) -> bytes:
    """msgpack's header of a ``bin`` of ``size`` bytes, the form its packer picks."""
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def frame_pieces(frame_type: str, header: dict[str, Any], tensors: list[dict[str, Any]]) -> FramePieces:
    """:func:`pack_frame`'s bytes as :class:`FramePieces`: values of at least ``PIECE_MIN``
    bytes given as memoryviews are not copied."""
    if frame_type not in FRAME_TYPES:
        raise SchemaError(f"unknown frame type {frame_type!r}")
    packer = msgpack.Packer(use_bin_type=True)
    pieces: list[bytes | bytearray | memoryview] = []
    small = bytearray(packer.pack_map_header(4))
    for key, value in (("fv", FORMAT_VERSION), ("type", frame_type), ("header", header)):
        small += packer.pack(key) + packer.pack(value)
    small += packer.pack("tensors") + packer.pack_array_header(len(tensors))
    for entry in tensors:
        small += packer.pack_map_header(len(entry))
        for key, value in entry.items():
            small += packer.pack(key)
            if isinstance(value, memoryview) and value.nbytes >= PIECE_MIN:
                small += _bin_header(value.nbytes)
                pieces += [bytes(small), value]
                small.clear()
            else:
                small += packer.pack(value)
    pieces.append(bytes(small))
    return FramePieces(pieces)


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed in fedjet frames")


def unpack_frame(data: bytes, limits: Limits, expect_type: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parse and shape-check a frame; returns its header and tensor entries. Values of at
    least ``PIECE_MIN`` bytes come back as memoryviews of ``data`` (not copies): a frame of a
    whole model is not held twice while it is decoded, and a writable frame's values can
    become tensors where they lie."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"frame must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_frame_bytes:
        raise LimitError(f"frame of {len(data)} bytes > limit {limits.max_frame_bytes}")
    body = _FrameReader(memoryview(data).cast("B"), limits).whole()
    if not isinstance(body, dict):
        raise DecodeError(f"frame must be a map, got {type(body).__name__}")
    version = body.get("fv")
    if version != FORMAT_VERSION:
        raise SchemaError(f"unknown frame format version {version!r} (this build reads {FORMAT_VERSION})")
    if body.get("type") != expect_type:
        raise SchemaError(f"expected a {expect_type} frame, got {body.get('type')!r:.40}")
    header, tensors = body.get("header"), body.get("tensors")
    if not isinstance(header, dict) or not isinstance(tensors, list):
        raise SchemaError("frame needs a 'header' map and a 'tensors' list")
    if len(tensors) > limits.max_tensors:
        raise LimitError(f"{len(tensors)} tensors > limit {limits.max_tensors}")
    if not all(isinstance(t, dict) for t in tensors):
        raise SchemaError("every tensor entry must be a map")
    return header, tensors


_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_MAX_DEPTH = 8  # a frame nests maps and lists a few levels deep, never more
_LEAF_WINDOW = 4096  # what one small value is parsed from first (a longer string: up to _MAX_LEAF)
_MAX_STR = 1 << 20
_MAX_LEAF = _MAX_STR + 16


class _FrameReader:
    """msgpack, read from a buffer without copying its big ``bin`` values: maps and lists are
    walked here; every other value (names, numbers, small bins) is parsed by msgpack itself,
    under the frame's limits, from a bounded window; a bin of ``PIECE_MIN`` bytes or more is
    a view of the buffer. Anything malformed is a ``DecodeError``."""

    def __init__(self, data: memoryview, limits: Limits) -> None:
        self.data, self.limits, self.at = data, limits, 0
        self.max_array = max(limits.max_tensors, 64)

    def whole(self) -> Any:
        value = self.value(0)
        if self.at != len(self.data):
            raise DecodeError(f"not a msgpack frame: {len(self.data) - self.at} bytes after its end")
        return value

    def value(self, depth: int) -> Any:
        if self.at >= len(self.data):
            raise DecodeError("not a msgpack frame: it ends inside a value")
        code = self.data[self.at]
        if code in _BIN_LENGTH_BYTES:
            return self._bin(_BIN_LENGTH_BYTES[code])
        is_map = 0x80 <= code <= 0x8F or code in (0xDE, 0xDF)
        if not (is_map or 0x90 <= code <= 0x9F or code in (0xDC, 0xDD)):
            return self._leaf(lambda unpacker: unpacker.unpack())
        if depth >= _MAX_DEPTH:
            raise DecodeError(f"not a msgpack frame: nested deeper than {_MAX_DEPTH}")
        if not is_map:
            count = self._leaf(lambda unpacker: unpacker.read_array_header())
            if count > self.max_array:
                raise DecodeError(f"not a msgpack frame: a list of {count} > {self.max_array} items")
            return [self.value(depth + 1) for _ in range(count)]
        count = self._leaf(lambda unpacker: unpacker.read_map_header())
        if count > 256:
            raise DecodeError(f"not a msgpack frame: a map of {count} > 256 keys")
        out = {}
        for _ in range(count):
            key = self.value(depth + 1)
            if not isinstance(key, str):
                raise DecodeError(f"not a msgpack frame: a map key of type {type(key).__name__}")
            out[key] = self.value(depth + 1)
        return out

    def _bin(self, width: int) -> bytes | memoryview:
        start = self.at + 1 + width
        if start > len(self.data):
            raise DecodeError("not a msgpack frame: it ends inside a bin header")
        end = start + int.from_bytes(self.data[self.at + 1 : start], "big")
        if end > len(self.data):
            raise DecodeError(f"not a msgpack frame: a bin of {end - start} bytes runs past its end")
        self.at = end
        return self.data[start:end] if end - start >= PIECE_MIN else bytes(self.data[start:end])

    def _leaf(self, read: Any) -> Any:
        for window in (_LEAF_WINDOW, _MAX_LEAF):
            unpacker = msgpack.Unpacker(
                raw=False, strict_map_key=True, ext_hook=_no_ext, max_bin_len=PIECE_MIN, max_str_len=_MAX_STR,
                max_array_len=self.max_array, max_map_len=256, max_buffer_size=_MAX_LEAF,
            )  # fmt: skip
            unpacker.feed(self.data[self.at : self.at + window])
            try:
                value = read(unpacker)
            except msgpack.OutOfData:
                if self.at + window >= len(self.data):
                    raise DecodeError("not a msgpack frame: it ends inside a value") from None
                continue
            except DecodeError:
                raise
            except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as e:
                raise DecodeError(f"not a msgpack frame: {type(e).__name__}: {e}"[:300]) from e
            self.at += unpacker.tell()
            return value
        raise DecodeError(f"not a msgpack frame: a value longer than {_MAX_LEAF} bytes")


def field(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], *, default: Any = ...) -> Any:
    """Read a typed field from a decoded map; missing or mistyped is a ``SchemaError``."""
    if key not in mapping:
        if default is ...:
            raise SchemaError(f"missing field {key!r}")
        return default
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if bytes in kinds and isinstance(value, memoryview):  # a frame's big value, where it lies
        return value
    if isinstance(value, bool) and bool not in kinds:
        raise SchemaError(f"field {key!r} must be {kind}, got bool")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise SchemaError(f"field {key!r} must be {kind}, got {type(value).__name__}")
    return value
