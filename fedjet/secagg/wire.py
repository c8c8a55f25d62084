"""Strict readers for decoded msgpack maps, and the canonical bytes that members sign.

Unknown keys are ignored (newer senders stay readable); a missing or mistyped field, or an
unknown version, is a ``SecAggSchemaError``. ``bool`` never passes for ``int``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]
import nacl.exceptions
from nacl.signing import SigningKey, VerifyKey

from fedjet.secagg.errors import SecAggAuthError, SecAggSchemaError

SECAGG_VERSION = 2  # 2: a 64-bit ring, signed member weights, the consistency round
MAX_MEMBERS = 1 << 14
KEY_BYTES = 32
SIG_BYTES = 64
T = TypeVar("T")


def header(raw: Any, kind: str) -> Mapping[str, Any]:
    """Check that ``raw`` is a map of this message kind and of a version this build reads."""
    if not isinstance(raw, Mapping):
        raise SecAggSchemaError(f"a {kind} message must be a map, got {type(raw).__name__}")
    if raw.get("kind") != kind:
        raise SecAggSchemaError(f"expected a {kind} message, got {raw.get('kind')!r:.40}")
    if raw.get("v") != SECAGG_VERSION:
        raise SecAggSchemaError(f"unknown secagg version {raw.get('v')!r:.20} (this build reads {SECAGG_VERSION})")
    return raw


def get(raw: Mapping[str, Any], key: str, kind: type[T]) -> T:
    if key not in raw:
        raise SecAggSchemaError(f"missing field {key!r}")
    value = raw[key]
    if isinstance(value, bool) and kind is not bool:
        raise SecAggSchemaError(f"field {key!r} must be {kind.__name__}, got bool")
    if not isinstance(value, kind):
        raise SecAggSchemaError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def get_count(raw: Mapping[str, Any], key: str) -> int:
    value = get(raw, key, int)
    if value < 0:
        raise SecAggSchemaError(f"field {key!r} must be >= 0, got {value}")
    return value


def get_key(raw: Mapping[str, Any], key: str, size: int = KEY_BYTES) -> bytes:
    value = get(raw, key, bytes)
    if len(value) != size:
        raise SecAggSchemaError(f"field {key!r} must be {size} bytes, got {len(value)}")
    return value


def get_names(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    values = get(raw, key, list)
    if len(values) > MAX_MEMBERS or not all(isinstance(v, str) for v in values):
        raise SecAggSchemaError(f"field {key!r} must be a list of at most {MAX_MEMBERS} names")
    return tuple(values)


def get_blobs(raw: Mapping[str, Any], key: str) -> dict[str, bytes]:
    """A ``{member name: bytes}`` map (ciphertexts or shares)."""
    values = get(raw, key, dict)
    if len(values) > MAX_MEMBERS:
        raise SecAggSchemaError(f"field {key!r} has more than {MAX_MEMBERS} entries")
    if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in values.items()):
        raise SecAggSchemaError(f"field {key!r} must map names to bytes")
    return dict(values)


def get_list(raw: Mapping[str, Any], key: str) -> list[Any]:
    values = get(raw, key, list)
    if len(values) > MAX_MEMBERS * MAX_MEMBERS:
        raise SecAggSchemaError(f"field {key!r} is too long")
    return values


def canonical(*parts: Any) -> bytes:
    """Deterministic bytes of a signed body (maps are passed as sorted item lists)."""
    body: bytes = msgpack.packb(["fedjet-secagg", SECAGG_VERSION, *parts], use_bin_type=True)
    return body


def sorted_items(mapping: Mapping[str, bytes]) -> list[list[Any]]:
    return [[k, mapping[k]] for k in sorted(mapping)]


def sign(body: bytes, key: SigningKey) -> bytes:
    return bytes(key.sign(body).signature)


def verify(body: bytes, sig: bytes, key: VerifyKey, who: str) -> None:
    try:
        key.verify(body, sig)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
        raise SecAggAuthError(f"signature of {who!r:.40} does not verify") from e
