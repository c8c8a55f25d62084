"""Key files on disk: ``NAME.key`` (secret, mode 0600) and ``NAME.pub`` (shareable).

``fedjet keys generate --out DIR --clouds aws,gcp,azure`` writes one pair for the
coordinator, one per cloud and one per observer (the evaluator of ``fedjet up``). Each
cloud's machine needs only its own ``.key`` and ``coordinator.pub``; the coordinator needs
``coordinator.key`` and every member's ``.pub``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fedjet.broker.subjects import check_token
from fedjet.codecs.crypto import COORDINATOR, Boxes, Identity, PublicIdentity
from fedjet.errors import ConfigError


def generate(out: str | Path, members: Iterable[str]) -> list[Path]:
    """Write key pairs for the coordinator and ``members``; refuses to overwrite."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    names = [COORDINATOR, *dict.fromkeys(members)]
    written: list[Path] = []
    for name in names:
        check_token("key", name)
        for suffix in (".key", ".pub"):
            if (directory / f"{name}{suffix}").exists():
                raise ConfigError(f"{directory / (name + suffix)} exists; not overwriting a key")
    for name in names:
        identity = Identity.generate(name)
        written += [_write_secret(directory, identity), _write_public(directory, identity.public)]
    return written


def _write_secret(directory: Path, identity: Identity) -> Path:
    body = {"box_secret": bytes(identity.box).hex(), "sign_secret": bytes(identity.sign).hex()}
    return _write(directory / f"{identity.name}.key", {"fedjet_key": 1, "name": identity.name, **body}, 0o600)


def _write_public(directory: Path, identity: PublicIdentity) -> Path:
    body = {"box_public": bytes(identity.box).hex(), "verify": bytes(identity.verify).hex()}
    return _write(directory / f"{identity.name}.pub", {"fedjet_pub": 1, "name": identity.name, **body}, 0o644)


def _write(path: Path, body: dict[str, object], mode: int) -> Path:
    """Create ``path`` with ``mode`` from the start (a secret is never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh)
    return path


def load_identity(directory: str | Path, name: str) -> Identity:
    path = Path(directory) / f"{name}.key"
    body = _read(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret key {path} has mode {mode:o}: others may read it; chmod 600 it first")
    try:
        return Identity(
            name,
            PrivateKey(bytes.fromhex(body["box_secret"])),
            SigningKey(bytes.fromhex(body["sign_secret"])),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a fedjet secret key: {e}") from e


def load_public(directory: str | Path, name: str) -> PublicIdentity:
    path = Path(directory) / f"{name}.pub"
    body = _read(path)
    try:
        return PublicIdentity(
            name, PublicKey(bytes.fromhex(body["box_public"])), VerifyKey(bytes.fromhex(body["verify"]))
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a fedjet public key: {e}") from e


def coordinator_boxes(directory: str | Path, members: Iterable[str]) -> Boxes:
    return Boxes(load_identity(directory, COORDINATOR), {m: load_public(directory, m) for m in members})


def member_boxes(directory: str | Path, name: str) -> Boxes:
    return Boxes(load_identity(directory, name), {COORDINATOR: load_public(directory, COORDINATOR)})


def _read(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"key file {path} not found (fedjet keys generate --out DIR ...)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read key file {path}: {e}") from e
    if not isinstance(body, dict):
        raise ConfigError(f"{path} is not a fedjet key file")
    return body
