"""Key files on disk: ``NAME.key`` (secret, mode 0600) and ``NAME.pub`` (shareable).

Each party makes its own pair where it runs and hands out only its ``.pub``::

    fedjet keys generate --cloud aws --out keys/          # on aws's machine: aws.key, aws.pub
    fedjet keys generate --coordinator --out keys/        # on the coordinator's machine
    fedjet keys add coordinator.pub gcp.pub --out keys/   # others' public keys, copied in

A cloud's directory then holds its own ``.key`` and ``.pub``, ``coordinator.pub`` and (for
``--secure-agg``, which checks every member's signed messages) every other cloud's ``.pub``;
the coordinator's holds ``coordinator.key`` and every member's ``.pub``. Nobody holds a secret
that is not theirs, so an update signed with a cloud's key came from that cloud.

``fedjet keys generate --out DIR --clouds aws,gcp,azure`` writes every pair at once (the
coordinator, each cloud and each observer): for the one-machine demo of ``fedjet up``, where one
operator legitimately runs every party.
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
    """Write key pairs for the coordinator and ``members`` (one operator runs them all);
    refuses to overwrite."""
    return _generate(Path(out), [COORDINATOR, *dict.fromkeys(members)])


def generate_one(out: str | Path, name: str) -> list[Path]:
    """Write ``name``'s own pair, and nothing of anyone else's; refuses to overwrite."""
    return _generate(Path(out), [name])


def _generate(directory: Path, names: list[str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names:
        check_token("key", name)
        for suffix in (".key", ".pub"):
            if (directory / f"{name}{suffix}").exists():
                raise ConfigError(f"{directory / (name + suffix)} exists; not overwriting a key")
    for name in names:
        identity = Identity.generate(name)
        written += [_write_secret(directory, identity), write_public(directory, identity.public)]
    return written


def add_public(out: str | Path, files: Iterable[str | Path]) -> list[Path]:
    """Copy other parties' public keys into ``out`` as ``NAME.pub``. Every file is checked
    before any is written: each must be a fedjet public key (never a secret key) named as its
    file is, and none may replace a different key of the same name (the same key again is a
    no-op). Returns the files written."""
    directory = Path(out)
    incoming: dict[str, PublicIdentity] = {}
    for file in files:
        identity = read_public_file(Path(file))
        if Path(file).name != f"{identity.name}.pub":
            raise ConfigError(f"{file} holds {identity.name!r}'s public key; name it {identity.name}.pub")
        if identity.name in incoming and not _same(incoming[identity.name], identity):
            raise ConfigError(f"two different public keys for {identity.name!r} given")
        incoming[identity.name] = identity
    fresh = []
    for name, identity in incoming.items():
        held = _held_public(directory, name)
        if held is not None and not _same(held, identity):
            raise ConfigError(
                f"{directory / (name + '.pub')} holds a different key for {name!r}; not overwriting it "
                "(remove it first if that party really has a new key)"
            )
        if held is None:
            fresh.append(identity)
    directory.mkdir(parents=True, exist_ok=True)
    return [write_public(directory, identity) for identity in fresh]


def _held_public(directory: Path, name: str) -> PublicIdentity | None:
    """The key ``directory`` already holds for ``name``: its ``.pub``, or its secret's public half."""
    if (directory / f"{name}.pub").exists():
        return load_public(directory, name)
    if (directory / f"{name}.key").exists():
        return load_identity(directory, name).public
    return None


def _same(a: PublicIdentity, b: PublicIdentity) -> bool:
    return bytes(a.box) == bytes(b.box) and bytes(a.verify) == bytes(b.verify)


def _write_secret(directory: Path, identity: Identity) -> Path:
    body = {"box_secret": bytes(identity.box).hex(), "sign_secret": bytes(identity.sign).hex()}
    return _write(directory / f"{identity.name}.key", {"fedjet_key": 1, "name": identity.name, **body}, 0o600)


def write_public(directory: Path, identity: PublicIdentity) -> Path:
    """``NAME.pub``: what a party hands to the others."""
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
    identity = read_public_file(Path(directory) / f"{name}.pub")
    if identity.name != name:
        raise ConfigError(f"{Path(directory) / (name + '.pub')} holds {identity.name!r}'s key, not {name!r}'s")
    return identity


def read_public_file(path: Path) -> PublicIdentity:
    """A ``.pub`` file, whatever it is called; a secret key file is refused, never read as one."""
    body = _read(path)
    if "fedjet_key" in body or "box_secret" in body or "sign_secret" in body:
        raise ConfigError(f"{path} is a secret key; hand out and add only .pub files")
    try:
        if body["fedjet_pub"] != 1:
            raise ValueError(f"unknown version {body['fedjet_pub']!r:.20}")
        name = body["name"]
        check_token("key", name)
        return PublicIdentity(
            name, PublicKey(bytes.fromhex(body["box_public"])), VerifyKey(bytes.fromhex(body["verify"]))
        )
    except (KeyError, ValueError, TypeError, ConfigError) as e:
        raise ConfigError(f"{path} is not a fedjet public key: {e}") from e


def coordinator_boxes(directory: str | Path, members: Iterable[str]) -> Boxes:
    return Boxes(load_identity(directory, COORDINATOR), {m: load_public(directory, m) for m in members})


def member_boxes(directory: str | Path, name: str) -> Boxes:
    return Boxes(load_identity(directory, name), {COORDINATOR: load_public(directory, COORDINATOR)})


def _read(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as e:
        how = "its owner hands it out; fedjet keys add" if path.suffix == ".pub" else "fedjet keys generate"
        raise ConfigError(f"key file {path} not found ({how} --out {path.parent})") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read key file {path}: {e}") from e
    if not isinstance(body, dict):
        raise ConfigError(f"{path} is not a fedjet key file")
    return body
