"""How a client proves who it is to NATS and checks who the server is.

``ClientAuth`` turns ``--nkey FILE`` (or ``--creds FILE``), ``--tls-ca FILE`` and an optional
client certificate into the keyword arguments of ``nats.connect``. With an NKEY the client also
gets an inbox prefix derived from its public key (``_INBOX.<public key>``): the generated
server permissions let each identity subscribe only to its own inboxes, so one cloud cannot
listen to the replies (JetStream acks, KV reads) meant for another.
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]

from fedjet.errors import ConfigError

INBOX_ROOT = "_INBOX"


def inbox_prefix(public_key: str) -> str:
    """The inbox prefix of the NKEY user ``public_key`` (the servers allow it, and only it)."""
    return f"{INBOX_ROOT}.{public_key}"


def public_key_of_seed(seed: bytes) -> str:
    """The ``U...`` public key of a user seed; a bad seed is a user mistake."""
    try:
        pair = nkeys.from_seed(bytearray(seed.strip()))
    except nkeys.NkeysError as e:
        raise ConfigError(f"not an NKEY seed: {type(e).__name__}") from e
    try:
        public = bytes(pair.public_key).decode()
    finally:
        pair.wipe()
    if not public.startswith("U"):
        raise ConfigError("the NKEY seed is not a user seed (SU...)")
    return public


@dataclass(frozen=True, kw_only=True)
class ClientAuth:
    """Credentials and TLS trust of one NATS client; every path is checked when it is built."""

    nkey: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.nkey is not None and self.creds is not None:
            raise ConfigError("give an NKEY seed file or a credentials file, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("a TLS client certificate needs its key (and the key its certificate)")
        for flag, path in self._paths().items():
            if not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        for flag in ("nkey", "creds", "tls_key"):
            path = getattr(self, flag)
            if path is not None and Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{flag} {path} is readable by others: chmod 600 it")
        if self.nkey is not None:
            public_key_of_seed(Path(self.nkey).read_bytes())  # refuse a bad seed now, not at connect

    def _paths(self) -> dict[str, str]:
        fields = {"nkey": self.nkey, "creds": self.creds, "tls_ca": self.tls_ca}
        fields |= {"tls_cert": self.tls_cert, "tls_key": self.tls_key}
        return {flag: path for flag, path in fields.items() if path is not None}

    @property
    def public_key(self) -> str | None:
        """The NKEY user this client authenticates as (None without an NKEY)."""
        if self.nkey is None:
            return None
        return public_key_of_seed(Path(self.nkey).read_bytes())

    def ssl_context(self) -> ssl.SSLContext | None:
        """Verify the server against ``tls_ca`` (system roots if only a client cert is given)."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None and self.tls_key is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (merge them with the URL and callbacks)."""
        kwargs: dict[str, Any] = {}
        public = self.public_key
        if self.nkey is not None and public is not None:
            kwargs["nkeys_seed"] = self.nkey
            kwargs["inbox_prefix"] = inbox_prefix(public)
        if self.creds is not None:
            kwargs["user_credentials"] = self.creds
        context = self.ssl_context()
        if context is not None:
            kwargs["tls"] = context
        return kwargs
