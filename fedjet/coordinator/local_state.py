"""The coordinator's own small, local, monotonic record: the newest version it published.

The broker is not trusted. It can hide the newest heads or lose its store, and a restarted
coordinator would then carry on from an older version, or from scratch, under the same job
name. With a state directory every published version is also written, atomically, to
``DIR/<job>.json``; a restart that finds less on the broker than it published refuses loudly.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fedjet.config.names import check_token
from fedjet.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Published:
    job: str
    version: int
    hash: str


def check_not_behind(mine: Published | None, found: Published | None) -> None:
    """Refuse to go on from ``found`` (what the broker shows) when this coordinator published
    something newer, or something else under the same version. Pure."""
    if mine is None:
        return
    if found is None:
        raise ConfigError(
            f"the broker holds no version of job {mine.job!r}, but this coordinator published version "
            f"{mine.version}: the store was lost or is being hidden; refusing to start the job over"
        )
    if found.version < mine.version:
        raise ConfigError(
            f"the broker's newest version of job {mine.job!r} is {found.version}, but this coordinator "
            f"published {mine.version}: newer heads are missing or hidden; refusing to roll back"
        )
    if found.version == mine.version and found.hash != mine.hash:
        raise ConfigError(f"job {mine.job!r} version {mine.version} on the broker is not the one published here")


class LocalState:
    """``DIR/<job>.json``, replaced atomically (write, fsync, rename) after each version."""

    def __init__(self, directory: str | Path, job: str) -> None:
        self.path = Path(directory) / f"{check_token('job', job)}.json"

    def read(self) -> Published | None:
        try:
            raw = json.loads(self.path.read_text())
            return Published(job=str(raw["job"]), version=int(raw["version"]), hash=str(raw["hash"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"coordinator state {self.path} is unreadable ({e}); refusing to guess") from e

    def write(self, published: Published) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(asdict(published), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
