"""Opening a recorded job: a kept JetStream store (``--store DIR``, served by an embedded
nats-server for the duration) or a live server (``--nats URL``), and the coordinator's keys.
Shared by ``fedjet replay`` and ``fedjet export``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from fedjet.broker.auth import ClientAuth
from fedjet.broker.connect import MAX_RECONNECTS, NatsTarget, open_target
from fedjet.broker.jetstream import close_quietly
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.kv import read_spec
from fedjet.codecs.crypto import COORDINATOR, Boxes
from fedjet.errors import ConfigError
from fedjet.keystore import load_identity, load_public
from fedjet.spec import JobSpec


def keys_dir_for(keys: str | None, store: str | None) -> str:
    if keys:
        return keys
    if store and (Path(store) / "keys").is_dir():
        return str(Path(store) / "keys")
    raise ConfigError("this needs the coordinator's keys: --keys DIR (coordinator.key and members' .pub)")


@contextlib.asynccontextmanager
async def recorded_jetstream(
    store: str | None,
    nats_url: str | None,
    name: str,
    *,
    auth: ClientAuth | None = None,
    domain: str | None = None,
    **connect: Any,
) -> AsyncIterator[Any]:
    """JetStream of a kept store (served by an embedded nats-server meanwhile) or of a running
    server; ``connect`` goes to :func:`open_target` (``timeout``, ``reconnects``)."""
    if (store is None) == (nats_url is None):
        raise ConfigError("give exactly one of --store DIR or --nats URL")
    server = None
    url = nats_url
    if store is not None:
        if not (Path(store) / "jetstream").is_dir():
            raise ConfigError(f"{store} holds no JetStream store (fedjet up --store DIR writes one)")
        server = EmbeddedNatsServer(store)
        url = server.start()
    assert url is not None
    connect.setdefault("reconnects", MAX_RECONNECTS)  # a one-shot read: fail in about a minute
    try:
        nc, js = await open_target(NatsTarget(url=url, auth=auth, domain=domain), name, **connect)
        try:
            yield js
        finally:
            await close_quietly(nc)
    finally:
        if server is not None:
            server.stop()


async def only_job(js: Any) -> str:
    """The one job recorded in this JetStream (listing streams needs more rights than reading one)."""
    try:
        names = [info.config.name for info in await js.streams_info()]
    except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
        raise ConfigError(f"cannot list the jobs here ({type(e).__name__}): say which with --job") from e
    prefix, suffix = "FEDJET_", "_GLOBALS"
    jobs = sorted(n[len(prefix) : -len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix))
    if len(jobs) != 1:
        raise ConfigError(f"say which --job; this JetStream holds {jobs or 'none'}")
    return jobs[0]


async def coordinator_view(js: Any, subjects: JobSubjects, keys_dir: str) -> tuple[JobSpec, Boxes]:
    """The recorded spec and the coordinator's boxes (which open every version and record)."""
    me = load_identity(keys_dir, COORDINATOR)
    spec = await read_spec(js, subjects, me.public)
    if spec is None:
        raise ConfigError(f"job {subjects.job!r} has no recorded spec in this JetStream")
    peers = {m: load_public(keys_dir, m) for m in (*spec.clouds, *spec.observers)}
    return spec, Boxes(me, peers)
