"""Subject, stream and bucket names of one job, in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedjet.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_token(kind: str, value: str) -> str:
    """Job and cloud names become subject tokens and stream names: keep them plain."""
    if not _NAME.fullmatch(value):
        raise ConfigError(f"{kind} name {value!r} must match [A-Za-z0-9_-]{{1,64}}")
    return value


@dataclass(frozen=True)
class JobSubjects:
    job: str

    def __post_init__(self) -> None:
        check_token("job", self.job)

    def update(self, cloud: str) -> str:
        return f"fedjet.{self.job}.update.{check_token('cloud', cloud)}"

    @property
    def updates(self) -> str:
        return f"fedjet.{self.job}.update.*"

    @property
    def global_head(self) -> str:
        """One small signed message per global version: where its weights are."""
        return f"fedjet.{self.job}.global"

    @property
    def global_data(self) -> str:
        """The (chunked, encrypted) weights of each global version."""
        return f"fedjet.{self.job}.global.data"

    @property
    def update_stream(self) -> str:
        return f"FEDJET_{self.job}_UPDATES"

    @property
    def global_stream(self) -> str:
        return f"FEDJET_{self.job}_GLOBALS"

    @property
    def kv_bucket(self) -> str:
        """Job spec, per-cloud stats and heartbeats."""
        return f"fedjet-{self.job}"

    @property
    def coordinator_durable(self) -> str:
        return "coordinator"

    @staticmethod
    def cloud_of(subject: str) -> str:
        return subject.rsplit(".", 1)[-1]
