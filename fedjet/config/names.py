"""Job, cloud and worker names: they become subject tokens and stream names, so keep them plain."""

from __future__ import annotations

import re

from fedjet.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_token(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ConfigError(f"{kind} name {value!r} must match [A-Za-z0-9_-]{{1,64}}")
    return value
