"""The job spec: everything a worker must agree on with the coordinator, published once.

The coordinator writes it to the job's KV bucket; workers read it instead of being configured
one by one, so three clouds cannot drift apart on model, codec or training settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fedjet.broker.subjects import check_token
from fedjet.codecs import crypto
from fedjet.codecs.crypto import Identity, PublicIdentity
from fedjet.errors import ConfigError, SchemaError

PARTITIONS = ("fixed", "noniid", "dynamic")
SPEC_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    job: str
    clouds: tuple[str, ...]
    model_config: dict[str, Any]
    train: dict[str, Any]
    tokenizer: str = "bytes"
    codec: str = "dense"
    strategy: str = "fedavg"
    strategy_config: dict[str, Any] = field(default_factory=dict)  # StrategyConfig.to_dict()
    synchronous: bool = True
    update_kind: str = "delta"
    delta_reference: str = "base"
    partition: str = "fixed"
    alpha: float = 0.5
    seed: int = 0
    observers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_token("job", self.job)
        if not self.clouds:
            raise ConfigError("a job needs at least one cloud")
        if len(set(self.clouds)) != len(self.clouds):
            raise ConfigError(f"cloud names must be unique: {self.clouds}")
        for cloud in (*self.clouds, *self.observers):
            check_token("cloud", cloud)
        if self.partition not in PARTITIONS:
            raise ConfigError(f"--partition must be one of {PARTITIONS}, got {self.partition!r}")

    def cloud_index(self, cloud: str) -> int:
        try:
            return self.clouds.index(cloud)
        except ValueError as e:
            raise ConfigError(f"cloud {cloud!r} is not part of job {self.job} {self.clouds}") from e

    def to_bytes(self) -> bytes:
        return json.dumps({"spec_version": SPEC_VERSION, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> JobSpec:
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SchemaError(f"job spec is not JSON: {e}") from e
        if not isinstance(raw, dict) or raw.pop("spec_version", None) != SPEC_VERSION:
            raise SchemaError("job spec has an unknown version")
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in raw.items() if k in known}
        try:
            fields["clouds"] = tuple(fields["clouds"])
            fields["observers"] = tuple(fields.get("observers", ()))
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise SchemaError(f"job spec is incomplete: {e}") from e


def sign_spec(spec: JobSpec, coordinator: Identity) -> bytes:
    return crypto.sign(spec.to_bytes(), coordinator)


def verify_spec(data: bytes, coordinator: PublicIdentity) -> JobSpec:
    """A spec counts only if the coordinator signed it."""
    return JobSpec.from_bytes(crypto.verify(data, coordinator))
