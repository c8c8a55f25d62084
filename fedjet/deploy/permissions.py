"""Who may publish and subscribe to what: the allow lists the NATS servers enforce.

Pure data, one function per role, so the JetStream API subjects a role needs can be extended
in one place. Everything not listed is denied by the server (a permissions violation), not by
fedjet. Each identity subscribes only under its own inbox prefix (see ``fedjet.broker.auth``):
JetStream acks, KV reads and ordered-consumer deliveries all arrive there.

Clouds and observers use the JetStream API of the hub's domain, ``$JS.<domain>.API``: it is the
only JetStream API a client behind a leaf node can reach (a leaf denies the plain ``$JS.API.>``
and ``$KV.>`` towards the hub), and the hub serves it to its own clients too. A KV put is
therefore published to ``$JS.<domain>.API.$KV.<bucket>.<key>``.

- a **cloud** publishes only its own update subject (and its own secure-aggregation subject),
  its own ``stats.<cloud>`` KV key, and the JetStream requests that reading global versions,
  the job spec and the secure-aggregation stream need;
- an **observer** reads global versions, the KV bucket (spec, stats) and stream info;
- the **coordinator** does anything under the job's subjects, the JetStream API and the bucket;
- a cloud's **leaf node** is held on the hub to what that cloud's workers may do.

**Island mode** (``island=True``): the leaf runs JetStream in a domain named after the cloud.
On its leaf the cloud may also create and read its island stream (its own updates, on a
subject its leaf never forwards) and the mirrors of the hub's global versions and of the job
spec. On the hub the leaf may additionally carry the mirrors' traffic (consumer requests from
the leaf, deliveries under :meth:`~fedjet.broker.subjects.JobSubjects.mirror_deliver` to it)
and the hub's sourcing of the island stream (consumer requests in the cloud's domain to it,
deliveries under ``source_deliver`` from it): only under its own cloud's names, so a leaf can
neither read another cloud's deliveries nor answer in another cloud's domain.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedjet.broker.subjects import JobSubjects, check_token, js_api

LOCAL_API = "$JS.API"  # the JetStream API of the server a client is connected to


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    CLOUD = "cloud"
    OBSERVER = "observer"
    LEAF = "leaf"


@dataclass(frozen=True, kw_only=True)
class Permissions:
    """Allow lists; an empty list allows nothing."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def permissions_for(
    role: Role, job: str, *, inbox: str, domain: str, cloud: str | None = None, island: bool = False
) -> Permissions:
    """The allow lists of one identity of ``job`` whose inbox prefix is ``inbox``; ``island``:
    the cloud's leaf runs JetStream in the domain named after the cloud (see the module doc)."""
    subjects = JobSubjects(job)
    api = js_api(domain)
    if role in (Role.CLOUD, Role.LEAF):
        if cloud is None:
            raise ValueError(f"the {role.value} role needs a cloud")
        base = _cloud(subjects, check_token("cloud", cloud), inbox, api)
        if not island:
            return base
        extra = _island_cloud(subjects, cloud, api) if role is Role.CLOUD else _island_leaf(subjects, cloud, api)
        return Permissions(publish=base.publish + extra.publish, subscribe=base.subscribe + extra.subscribe)
    if role is Role.OBSERVER:
        return _observer(subjects, inbox, api)
    return _coordinator(subjects, inbox, api)


def _stream_read(stream: str, api: str) -> list[str]:
    """Ordered and pull consumers without acks, direct / stored message gets on one stream:
    reading, never changing it (a version's chunks are read by a throwaway pull consumer)."""
    return [
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.FC.{stream}.>",  # flow-control replies of ordered consumers
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.STREAM.MSG.GET.{stream}",
    ]


def _kv_stream(subjects: JobSubjects) -> str:
    return f"KV_{subjects.kv_bucket}"


def _spec_read(subjects: JobSubjects, api: str) -> list[str]:
    """Opening the bucket and reading its ``spec`` key.

    A direct get names the key in the subject; the stored-message get (used while the bucket
    is created without direct gets) names it in the body, so the server cannot narrow it.
    """
    kv = _kv_stream(subjects)
    return [
        f"{api}.STREAM.INFO.{kv}",
        f"{api}.DIRECT.GET.{kv}.$KV.{subjects.kv_bucket}.spec",
        f"{api}.STREAM.MSG.GET.{kv}",
    ]


def _cloud(subjects: JobSubjects, cloud: str, inbox: str, api: str) -> Permissions:
    publish = [
        subjects.update(cloud),
        subjects.secagg_up(cloud),  # secure aggregation: its own protocol steps, sealed
        f"{api}.$KV.{subjects.kv_bucket}.stats.{cloud}",
        f"{api}.INFO",
        *_stream_read(subjects.global_stream, api),
        *_stream_read(subjects.secagg_stream, api),
        *_spec_read(subjects, api),
    ]
    return Permissions(publish=tuple(publish), subscribe=(f"{inbox}.>",))


def _island_cloud(subjects: JobSubjects, cloud: str, api: str) -> Permissions:
    """On its own leaf: its island stream and the two mirrors, through the leaf's own API;
    the hub's KV key that says its island stream is there to source."""
    own = [subjects.island_stream(cloud), subjects.global_stream, _kv_stream(subjects)]
    manage = [f"{LOCAL_API}.{verb}.{stream}" for stream in own for verb in ("STREAM.CREATE", "STREAM.UPDATE")]
    publish = [
        subjects.island_update(cloud),
        f"{LOCAL_API}.INFO",
        *manage,
        *_stream_read(subjects.island_stream(cloud), LOCAL_API),  # what waits there (status, audits)
        *_stream_read(subjects.global_stream, LOCAL_API),
        *_spec_read(subjects, LOCAL_API),
        f"{api}.$KV.{subjects.kv_bucket}.{subjects.island_key(cloud)}",
    ]
    return Permissions(publish=tuple(publish), subscribe=())


def _island_leaf(subjects: JobSubjects, cloud: str, api: str) -> Permissions:
    """On the hub, what an island-capable leaf carries besides its cloud's own traffic.

    Mirrors (leaf asks, hub delivers): consumer requests on the global stream (already a
    cloud's) and on the bucket filtered to the spec key; their replies (``$JSC.R``), deliveries
    under the cloud's mirror prefix, flow-control answers. Sourcing (hub asks, leaf delivers):
    requests in the cloud's domain for its island stream only, deliveries under the cloud's
    source prefix, flow control back to the leaf's consumer.
    """
    island, kv = subjects.island_stream(cloud), _kv_stream(subjects)
    domain_api = js_api(cloud)
    publish = [
        f"{api}.CONSUMER.CREATE.{kv}.*.$KV.{subjects.kv_bucket}.{subjects.spec_key}",
        f"{api}.CONSUMER.DELETE.{kv}.*",
        *(f"$JS.FC.*.*.{stream}.>" for stream in (subjects.global_stream, kv)),
        f"$JS.FC.{kv}.>",
        "$JSC.R.*",  # answers to the hub's consumer requests
        f"{subjects.source_deliver(cloud)}.>",
        f"{api}.$KV.{subjects.kv_bucket}.{subjects.island_key(cloud)}",  # its worker's announcement
    ]
    subscribe = [
        "$JSC.R.*",  # answers to the leaf's consumer requests
        f"{subjects.mirror_deliver(cloud)}.>",
        f"{domain_api}.CONSUMER.CREATE.{island}",
        f"{domain_api}.CONSUMER.CREATE.{island}.>",
        f"{domain_api}.CONSUMER.DELETE.{island}.*",
        f"{domain_api}.STREAM.INFO.{island}",
        f"$JS.FC.{island}.>",
        f"$JS.FC.*.*.{island}.>",
    ]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def _observer(subjects: JobSubjects, inbox: str, api: str) -> Permissions:
    reads = [
        f"{api}.STREAM.INFO.{subjects.update_stream}",
        *_stream_read(subjects.global_stream, api),
        *_stream_read(_kv_stream(subjects), api),
    ]
    # An observer connects to the hub itself, which maps ``$JS.<domain>.API.>`` onto its own
    # ``$JS.API.>`` before it checks permissions: allow the same reads under the local name.
    local = [_local_api(subject, api) for subject in reads if subject.startswith(f"{api}.")]
    return Permissions(publish=(f"{api}.INFO", *reads, *local), subscribe=(f"{inbox}.>",))


def _local_api(subject: str, api: str) -> str:
    """``$JS.<domain>.API.X`` as the hub sees it after its domain mapping: ``$JS.API.X``."""
    return LOCAL_API + subject[len(api) :]


def _coordinator(subjects: JobSubjects, inbox: str, api: str) -> Permissions:
    streams = (subjects.update_stream, subjects.global_stream, subjects.secagg_stream, _kv_stream(subjects))
    publish = [
        f"fedjet.{subjects.job}.>",
        "$JS.API.>",
        f"{api}.>",
        f"$KV.{subjects.kv_bucket}.>",
        *(f"$JS.ACK.{stream}.>" for stream in streams),
        *(f"$JS.FC.{stream}.>" for stream in streams),
    ]
    return Permissions(publish=tuple(publish), subscribe=(f"{inbox}.>", f"fedjet.{subjects.job}.>"))
