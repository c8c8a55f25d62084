"""What the user asked for: the ``--dp`` and ``--central-dp`` flags as validated, frozen configs.

Pure (no torch, no accounting): the entry point parses the flag once, the job spec carries the
wire dict, and every worker rebuilds the same :class:`DPConfig` from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedjet.errors import ConfigError, SchemaError

ACCOUNTANTS = ("rdp", "pld")

DP_FLAG_HELP = "--dp epsilon=E,delta=D,clip=C[,updates=K][,accountant=rdp|pld] or --dp noise=S,delta=D,clip=C"
CENTRAL_DP_FLAG_HELP = "--central-dp clip=C,noise=Z"


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Record-level DP-SGD in every worker.

    Give either a target ``epsilon`` (each worker calibrates its noise multiplier for the steps it
    plans) or a fixed ``noise`` multiplier σ (each worker reports the ε it reaches); never both,
    because then one of them would silently be ignored.
    """

    epsilon: float | None
    delta: float
    clip: float
    noise: float | None
    accountant: str = "rdp"
    updates: int | None = None  # updates each cloud plans (σ is calibrated for them); default: the job's rounds

    def __post_init__(self) -> None:
        if self.updates is not None and self.updates < 1:
            raise ConfigError(f"dp updates must be >= 1, got {self.updates}")
        if (self.epsilon is None) == (self.noise is None):
            raise ConfigError(f"differential privacy needs exactly one of epsilon= or noise=: {DP_FLAG_HELP}")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"dp epsilon must be a finite number > 0, got {self.epsilon}")
        if self.noise is not None and not (math.isfinite(self.noise) and self.noise > 0):
            raise ConfigError(f"dp noise multiplier must be a finite number > 0, got {self.noise}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp delta must lie strictly between 0 and 1, got {self.delta}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"dp clip must be a finite number > 0, got {self.clip}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"dp accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "clip": self.clip,
            "noise": self.noise,
            "accountant": self.accountant,
            "updates": self.updates,
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> DPConfig:
        """Rebuild from a job spec; unknown keys are ignored so newer coordinators stay readable."""
        return cls(
            epsilon=_wire_optional(raw, "epsilon"),
            delta=_wire_number(raw, "delta"),
            clip=_wire_number(raw, "clip"),
            noise=_wire_optional(raw, "noise"),
            accountant=_wire_text(raw, "accountant", default="rdp"),
            updates=int(raw["updates"]) if isinstance(raw.get("updates"), int) else None,
        )


@dataclass(frozen=True, kw_only=True)
class CentralDPConfig:
    """DP-FedAvg at the coordinator: clip each cloud's update to ``clip``, add N(0, (noise·clip)²).

    It protects whole clouds, so it means something only with many workers per round.
    """

    clip: float
    noise: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"central dp clip must be a finite number > 0, got {self.clip}")
        if not (math.isfinite(self.noise) and self.noise > 0):
            raise ConfigError(f"central dp noise multiplier must be a finite number > 0, got {self.noise}")

    def to_wire(self) -> dict[str, Any]:
        return {"clip": self.clip, "noise": self.noise}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CentralDPConfig:
        return cls(clip=_wire_number(raw, "clip"), noise=_wire_number(raw, "noise"))


def parse_dp(text: str) -> DPConfig:
    """Parse ``epsilon=E,delta=D,clip=C`` (or ``noise=S`` instead of epsilon; ``accountant=pld``)."""
    fields = _key_values(text, "--dp", DP_FLAG_HELP)
    allowed = {"epsilon", "delta", "clip", "noise", "accountant", "updates"}
    _check_keys(fields, allowed, required={"delta", "clip"}, flag="--dp", usage=DP_FLAG_HELP)
    return DPConfig(
        epsilon=_flag_number(fields, "epsilon", "--dp"),
        delta=_required(_flag_number(fields, "delta", "--dp")),
        clip=_required(_flag_number(fields, "clip", "--dp")),
        noise=_flag_number(fields, "noise", "--dp"),
        accountant=fields.get("accountant", "rdp").lower(),
        updates=_whole(_flag_number(fields, "updates", "--dp")),
    )


def _whole(value: float | None) -> int | None:
    if value is None:
        return None
    if value != int(value):
        raise ConfigError(f"--dp updates must be a whole number, got {value}")
    return int(value)


def parse_central_dp(text: str) -> CentralDPConfig:
    """Parse ``clip=C,noise=Z``."""
    fields = _key_values(text, "--central-dp", CENTRAL_DP_FLAG_HELP)
    _check_keys(fields, {"clip", "noise"}, required={"clip", "noise"}, flag="--central-dp", usage=CENTRAL_DP_FLAG_HELP)
    return CentralDPConfig(
        clip=_required(_flag_number(fields, "clip", "--central-dp")),
        noise=_required(_flag_number(fields, "noise", "--central-dp")),
    )


def _key_values(text: str, flag: str, usage: str) -> dict[str, str]:
    """``a=1,b=2`` as a dict; empty parts, missing ``=`` and repeated keys are user mistakes."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"{flag} {text!r}: expected key=value pairs separated by commas, e.g. {usage}")
        if key in fields:
            raise ConfigError(f"{flag} {text!r}: {key} given twice")
        fields[key] = value
    return fields


def _check_keys(fields: Mapping[str, str], allowed: set[str], *, required: set[str], flag: str, usage: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"{flag}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)} ({usage})")
    missing = sorted(required - set(fields))
    if missing:
        raise ConfigError(f"{flag}: missing {missing} ({usage})")


def _flag_number(fields: Mapping[str, str], key: str, flag: str) -> float | None:
    if key not in fields:
        return None
    try:
        return float(fields[key])
    except ValueError as e:
        raise ConfigError(f"{flag}: {key}={fields[key]!r} is not a number") from e


def _required(value: float | None) -> float:
    assert value is not None, "_check_keys guarantees required keys"
    return value


def _wire_optional(raw: Mapping[str, Any], key: str) -> float | None:
    return None if raw.get(key) is None else _wire_number(raw, key)


def _wire_number(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(f"dp config field {key!r} must be a number, got {value!r}")
    return float(value)


def _wire_text(raw: Mapping[str, Any], key: str, *, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise SchemaError(f"dp config field {key!r} must be a string, got {value!r}")
    return value
