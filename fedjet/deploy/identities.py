"""NKEY users: one seed per identity, written only into that identity's own folder.

The server configs carry only public keys (``U...``); a seed never leaves the folder of the
identity (or leaf node) that signs with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nkeys  # type: ignore[import-untyped]

from fedjet.broker.auth import inbox_prefix, public_key_of_seed
from fedjet.deploy.files import write_secret


@dataclass(frozen=True, kw_only=True)
class NkeyUser:
    """A user's public key and where its seed lives."""

    name: str
    public_key: str
    seed_path: Path

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.public_key)


def new_user_seed() -> bytes:
    """A fresh user seed (``SU...``) from the OS random source."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def create_user(name: str, seed_path: Path) -> NkeyUser:
    """Generate a user, write its seed (mode 0600) to ``seed_path`` and return its public half."""
    seed = new_user_seed()
    write_secret(seed_path, seed + b"\n")
    return NkeyUser(name=name, public_key=public_key_of_seed(seed), seed_path=seed_path)
