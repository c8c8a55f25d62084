"""NATS URLs that may carry credentials (``nats://user:password@host:4222``, ``nats://token@host``).

Credentials never appear in what fedjet prints, logs or writes (:func:`redact_url`), and never
in a child process's command line: :func:`split_userinfo` takes them out so they travel in the
environment (``FEDJET_NATS_USERINFO``), and :func:`with_userinfo` puts them back at connect.
"""

from __future__ import annotations

import re

NATS_USERINFO_ENV = "FEDJET_NATS_USERINFO"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/\s,]*)@")


def redact_url(text: str) -> str:
    """``text`` (a URL, a comma-separated list, or a message quoting them) with every
    ``user:password@`` or ``token@`` replaced by ``***@``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(the URL or list without credentials, the first credentials found or None)."""
    found = _USERINFO.search(url)
    return _USERINFO.sub(lambda m: m["scheme"], url), (found["userinfo"] if found else None)


def with_userinfo(url: str, userinfo: str | None) -> str:
    """Put ``userinfo`` into every URL of ``url`` that carries none."""
    if not userinfo:
        return url
    parts = []
    for part in url.split(","):
        part = part.strip()
        if "://" in part and not _USERINFO.match(part):
            scheme, rest = part.split("://", 1)
            part = f"{scheme}://{userinfo}@{rest}"
        parts.append(part)
    return ",".join(parts)
