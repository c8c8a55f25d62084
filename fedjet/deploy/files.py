"""Writing generated files: secrets are created with their final mode, nothing is overwritten."""

from __future__ import annotations

import os
from pathlib import Path

from fedjet.errors import ConfigError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def write_file(path: Path, data: bytes | str, *, mode: int = PUBLIC_MODE) -> Path:
    """Create ``path`` with ``mode`` from the first byte on (a seed is never briefly readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise ConfigError(f"{path} exists; not overwriting a generated file") from e
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
    os.chmod(path, mode)  # the umask may have removed bits we want (never adds any)
    return path


def write_secret(path: Path, data: bytes | str) -> Path:
    """A private key or seed: owner read/write only, in a folder only the owner can list."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_file(path, data, mode=SECRET_MODE)
