"""One generic dataclass <-> plain-data mapping for config, the job spec and version records.

``to_wire`` turns a (nested) frozen dataclass into dicts, lists and scalars that JSON, msgpack
and TOML all carry. ``from_wire`` is its inverse and the single place where types are checked:
unknown keys are ignored (``strict=False``, for messages written by newer peers) or refused
(``strict=True``, for a user's config file, where a typo must not pass silently).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from fedjet.errors import ConfigError

T = TypeVar("T")


class WireError(ConfigError):
    """A config file, spec or record holds a value of the wrong type or an unknown key."""


def to_wire(value: Any) -> Any:
    """Plain data for a dataclass tree (tuples become lists, nested dataclasses dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [to_wire(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_wire(v) for k, v in value.items()}
    return value


def from_wire(cls: type[T], raw: Any, *, strict: bool = False, where: str = "") -> T:
    """Build ``cls`` from plain data; missing keys take the dataclass defaults."""
    where = where or cls.__name__
    if not isinstance(raw, Mapping):
        raise WireError(f"{where}: expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if strict and unknown:
        raise WireError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {name: _coerce(hints[name], raw[name], strict, f"{where}.{name}") for name in known if name in raw}
    try:
        return cls(**values)
    except TypeError as e:
        raise WireError(f"{where}: {e}") from e


def _coerce(hint: Any, value: Any, strict: bool, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, strict, where)
            except WireError as e:
                errors.append(str(e))
        raise WireError(errors[0] if len(errors) == 1 else f"{where}: {value!r:.60} fits none of {options}")
    if dataclasses.is_dataclass(hint):
        return from_wire(hint, value, strict=strict, where=where)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise WireError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, strict, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise WireError(f"{where}: expected a table, got {type(value).__name__}")
        return {
            _coerce(args[0], k, strict, where): _coerce(args[1], v, strict, f"{where}.{k}") for k, v in value.items()
        }
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML and JSON write 1.0 as 1
    if hint in (int, float) and isinstance(value, bool):
        raise WireError(f"{where}: expected {hint.__name__}, got a boolean")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise WireError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r:.60}")
    return value
