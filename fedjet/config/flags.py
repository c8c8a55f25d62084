"""Two front doors to one :class:`JobConfig`: CLI flags derived from the tree, and ``job.toml``.

Precedence: dataclass defaults < ``--config job.toml`` < flags given on the command line. A
flag is registered with default ``None`` so that only what the user typed overrides the file.
The TOML layout mirrors the tree: top-level job keys, then ``[strategy]``,
``[strategy.staleness]``, ``[strategy.server]``, ``[round]``, ``[train]``, ``[partition]`` and
``[stop]`` tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedjet.config.job import JobConfig
from fedjet.config.wire import from_wire, to_wire
from fedjet.errors import ConfigError

Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FlagField:
    """One leaf of the tree that a flag sets."""

    path: Path_
    flag: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None
    const: str | None = None  # the value of the bare flag (``--secure-agg`` alone means "on")
    metavar: str | None = None  # what ``--help`` shows for the value; the leaf's name by default

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)

    @property
    def shown_as(self) -> str | None:
        """``--server-lr LR``, ``--clouds NAME,...``: what a person would write, never the dest."""
        if self.metavar is not None:
            return self.metavar
        if self.choices is not None:
            return None  # argparse shows {a,b,c}
        if self.parse is parse_names:
            return "NAME,..."
        return self.path[-1].upper()


def flag_fields(cls: type = JobConfig, prefix: Path_ = ()) -> Iterator[FlagField]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from flag_fields(hint, (*prefix, f.name))  # type: ignore[arg-type]
        elif "flag" in f.metadata:
            meta = f.metadata
            help_, choices, const = meta.get("help", ""), meta.get("choices"), meta.get("const")
            parse = _parser(hint)
            yield FlagField((*prefix, f.name), meta["flag"], parse, help_, choices, const, meta.get("metavar"))


def _parser(hint: Any) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is tuple:
        return parse_names
    return base if base in (int, float, str) else str


def parse_names(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, e.g. aws,gcp,azure")
    return names


def add_config_flags(parser: argparse.ArgumentParser, *, only: set[str] | None = None, with_file: bool = True) -> None:
    """One flag per tree leaf (``only``: the subset of flags, e.g. the aggregation ones)."""
    if with_file:
        parser.add_argument("--config", default=None, metavar="job.toml", help="job config file (flags override it)")
    group = parser.add_argument_group("job (also settable in --config job.toml)")
    for ff in flag_fields():
        if only is not None and ff.flag not in only:
            continue
        bare: dict[str, Any] = {} if ff.const is None else {"nargs": "?", "const": ff.const}
        group.add_argument(
            ff.flag, dest=ff.dest, type=ff.parse, default=None, choices=ff.choices, help=ff.help,
            metavar=ff.shown_as, **bare,
        )  # fmt: skip


def overrides_from(ns: argparse.Namespace) -> dict[str, Any]:
    """The nested dict of what was given on the command line."""
    out: dict[str, Any] = {}
    for ff in flag_fields():
        value = getattr(ns, ff.dest, None)
        if value is not None:
            _set(out, ff.path, list(value) if isinstance(value, tuple) else value)
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from e


def job_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults < file < overrides, validated as one tree."""
    merged = read_toml(file) if file else {}
    _merge(merged, overrides or {})
    return from_wire(JobConfig, merged, strict=True, where=str(file) if file else "flags")


def config_from_args(ns: argparse.Namespace) -> JobConfig:
    return job_config(getattr(ns, "config", None), overrides_from(ns))


def _set(out: dict[str, Any], path: Path_, value: Any) -> None:
    for key in path[:-1]:
        out = out.setdefault(key, {})
    out[path[-1]] = value


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def to_toml(config: JobConfig) -> str:
    """A ``job.toml`` that parses back to ``config`` (``None`` values are left out)."""
    lines: list[str] = []
    _write_table(lines, (), to_wire(config))
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(lines: list[str], path: Path_, table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    if path and scalars:
        lines += ["", f"[{'.'.join(path)}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in scalars.items()]
    for key, value in table.items():
        if isinstance(value, dict):
            _write_table(lines, (*path, key), value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")
