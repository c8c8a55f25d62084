"""The topology generator without running servers: permissions, files, modes, configs, the map."""

from __future__ import annotations

import itertools
import json
import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from fedjet.broker.auth import ClientAuth, inbox_prefix, public_key_of_seed
from fedjet.broker.server import find_nats_server
from fedjet.broker.subjects import JobSubjects, kv_put_subject
from fedjet.deploy import TopologyConfig, generate, load_topology
from fedjet.deploy.configs import Raw, User, render, user_block
from fedjet.deploy.files import write_secret
from fedjet.deploy.identities import new_user_seed
from fedjet.deploy.permissions import Permissions, Role, permissions_for
from fedjet.errors import ConfigError

JOB = "j"
CLOUDS = ("aws", "gcp", "azure")
DOMAIN = "hub"
SUBJECTS = JobSubjects(JOB)
INBOX = "_INBOX.UME"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` one or more trailing tokens."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(pat) == len(sub)


def allowed(permissions: Permissions, subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in permissions.publish)


def cloud(name: str) -> Permissions:
    return permissions_for(Role.CLOUD, JOB, inbox=INBOX, domain=DOMAIN, cloud=name)


def test_subject_matcher_itself():
    assert matches("a.*.c", "a.b.c") and not matches("a.*", "a.b.c")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")
    assert matches("$JS.hub.API.INFO", "$JS.hub.API.INFO")


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(CLOUDS, 2)))
def test_a_cloud_may_not_publish_another_clouds_update_or_stats(a, b):
    assert allowed(cloud(a), SUBJECTS.update(a))
    assert not allowed(cloud(a), SUBJECTS.update(b))
    assert allowed(cloud(a), kv_put_subject(SUBJECTS.kv_bucket, f"stats.{a}", DOMAIN))
    assert not allowed(cloud(a), kv_put_subject(SUBJECTS.kv_bucket, f"stats.{b}", DOMAIN))


FORBIDDEN_TO_CLOUDS = [
    SUBJECTS.global_head,
    SUBJECTS.global_data,
    f"$KV.{SUBJECTS.kv_bucket}.spec",
    kv_put_subject(SUBJECTS.kv_bucket, "spec", DOMAIN),
    f"$JS.{DOMAIN}.API.STREAM.CREATE.{SUBJECTS.update_stream}",
    f"$JS.{DOMAIN}.API.STREAM.DELETE.{SUBJECTS.global_stream}",
    f"$JS.{DOMAIN}.API.STREAM.PURGE.{SUBJECTS.update_stream}",
    f"$JS.{DOMAIN}.API.CONSUMER.CREATE.{SUBJECTS.update_stream}",
    f"$JS.{DOMAIN}.API.DIRECT.GET.{SUBJECTS.update_stream}",
    f"$JS.{DOMAIN}.API.STREAM.MSG.DELETE.{SUBJECTS.global_stream}",
    "$JS.API.INFO",
    "fedjet.other.update.aws",
]


@pytest.mark.parametrize("subject", FORBIDDEN_TO_CLOUDS)
def test_clouds_and_observers_may_not_publish_globals_the_spec_or_manage_streams(subject):
    observer = permissions_for(Role.OBSERVER, JOB, inbox=INBOX, domain=DOMAIN)
    for permissions in (cloud("aws"), observer):
        assert not allowed(permissions, subject)


def test_observer_publishes_no_update_and_reads_what_it_needs():
    observer = permissions_for(Role.OBSERVER, JOB, inbox=INBOX, domain=DOMAIN)
    for name in CLOUDS:
        assert not allowed(observer, SUBJECTS.update(name))
    api = f"$JS.{DOMAIN}.API"
    for subject in (
        f"{api}.INFO",
        f"{api}.STREAM.INFO.{SUBJECTS.global_stream}",
        f"{api}.CONSUMER.CREATE.{SUBJECTS.global_stream}",
        f"{api}.DIRECT.GET.KV_{SUBJECTS.kv_bucket}.$KV.{SUBJECTS.kv_bucket}.stats.aws",
    ):
        assert allowed(observer, subject)


def test_cloud_reads_globals_and_the_spec():
    api = f"$JS.{DOMAIN}.API"
    for subject in (
        f"{api}.INFO",
        f"{api}.CONSUMER.CREATE.{SUBJECTS.global_stream}",
        f"{api}.CONSUMER.CREATE.{SUBJECTS.global_stream}.name.{SUBJECTS.global_head}",
        f"{api}.DIRECT.GET.{SUBJECTS.global_stream}",
        f"{api}.STREAM.INFO.KV_{SUBJECTS.kv_bucket}",
        f"{api}.DIRECT.GET.KV_{SUBJECTS.kv_bucket}.$KV.{SUBJECTS.kv_bucket}.spec",
        f"$JS.FC.{SUBJECTS.global_stream}.consumer.x",
    ):
        assert allowed(cloud("aws"), subject)
    other_key = f"{api}.DIRECT.GET.KV_{SUBJECTS.kv_bucket}.$KV.{SUBJECTS.kv_bucket}.stats.gcp"
    assert not allowed(cloud("aws"), other_key)  # a direct get names its key: only the spec


def test_coordinator_may_publish_globals_and_write_the_bucket():
    coordinator = permissions_for(Role.COORDINATOR, JOB, inbox=INBOX, domain=DOMAIN)
    for subject in (SUBJECTS.global_head, SUBJECTS.global_data, f"$KV.{SUBJECTS.kv_bucket}.spec", "$JS.API.INFO"):
        assert allowed(coordinator, subject)
    assert allowed(coordinator, f"$JS.ACK.{SUBJECTS.update_stream}.coordinator.1.2.3.4.5")
    assert not allowed(coordinator, "fedjet.other.global")


def test_every_role_subscribes_only_under_its_own_inbox():
    for role, name in ((Role.CLOUD, "aws"), (Role.LEAF, "aws"), (Role.OBSERVER, None)):
        permissions = permissions_for(role, JOB, inbox=INBOX, domain=DOMAIN, cloud=name)
        assert permissions.subscribe == (f"{INBOX}.>",)
    with pytest.raises(ValueError, match="needs a cloud"):
        permissions_for(Role.CLOUD, JOB, inbox=INBOX, domain=DOMAIN)


@pytest.fixture
def topology_dir(tmp_path: Path) -> Path:
    generate(TopologyConfig(clouds=CLOUDS, job=JOB, out=tmp_path / "t", base_port=30000))
    return tmp_path / "t"


def test_topology_json_has_the_documented_shape(topology_dir):
    body = json.loads((topology_dir / "topology.json").read_text())
    assert {"servers", "hub", "leaf", "ca", "identities"} <= set(body)
    assert [(s["name"], s["role"], s["cloud"]) for s in body["servers"]] == [
        ("hub-0", "hub", None),
        ("hub-1", "hub", None),
        ("hub-2", "hub", None),
        ("leaf-aws", "leaf", "aws"),
        ("leaf-gcp", "leaf", "gcp"),
        ("leaf-azure", "leaf", "azure"),
    ]
    assert all(set(s) >= {"name", "config", "role", "cloud"} and Path(s["config"]).is_file() for s in body["servers"])
    assert body["hub"] == ["tls://127.0.0.1:30000", "tls://127.0.0.1:30001", "tls://127.0.0.1:30002"]
    assert body["leaf"] == {
        "aws": "tls://127.0.0.1:30009",
        "gcp": "tls://127.0.0.1:30010",
        "azure": "tls://127.0.0.1:30011",
    }
    assert set(body["identities"]) == {*CLOUDS, "coordinator", "eval"}
    assert Path(body["ca"]).is_file()
    assert body["jetstream_domain"] == "hub" and body["replicas"] == 3 and body["tls"] is True
    assert load_topology(topology_dir).to_json() == body


def test_seeds_are_private_and_each_lives_only_in_its_own_folder(topology_dir):
    topology = load_topology(topology_dir)
    secrets = [*(topology_dir / "identities").glob("*/user.nk"), *(topology_dir / "servers").glob("*/leaf-seed.conf")]
    secrets += [*topology_dir.glob("**/*-key.pem")]
    assert len(secrets) == 5 + 3 + (2 + 6 + 3)  # seeds, leaf seeds, the two CA keys + server keys + route keys
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name, entry in topology.identities.items():
        assert entry.nkey == topology_dir / "identities" / name / "user.nk"
        assert sorted(p.name for p in entry.nkey.parent.iterdir()) == ["user.nk"]
        assert stat.S_IMODE(entry.nkey.parent.stat().st_mode) == 0o700
        assert public_key_of_seed(entry.nkey.read_bytes()) == entry.public_key
        assert entry.inbox_prefix == inbox_prefix(entry.public_key)
    seeds = {path: path.read_text().strip() for path in (topology_dir / "identities").glob("*/user.nk")}
    everything = {p: p.read_text(errors="replace") for p in topology_dir.rglob("*") if p.is_file()}
    for seed_path, seed in seeds.items():
        assert [p for p, text in everything.items() if seed in text] == [seed_path]


def test_every_generated_config_is_accepted_by_nats_server(topology_dir):
    configs = sorted((topology_dir / "servers").glob("*/nats.conf"))
    assert len(configs) == 6
    for config in configs:
        done = subprocess.run([find_nats_server(), "-t", "-c", str(config)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


def test_leaf_configs_run_jetstream_in_their_clouds_domain_and_hubs_route_to_each_other(topology_dir):
    leaf = (topology_dir / "servers" / "leaf-aws" / "nats.conf").read_text()
    assert 'domain: "aws"' in leaf and 'include "leaf-seed.conf"' in leaf
    assert str(topology_dir / "servers" / "leaf-aws" / "jetstream") in leaf
    assert load_topology(topology_dir).leaf_domains == {"aws": "aws", "gcp": "gcp", "azure": "azure"}
    assert leaf.count("nats-leaf://127.0.0.1:") == 3
    hub = (topology_dir / "servers" / "hub-0" / "nats.conf").read_text()
    assert "nats-route://127.0.0.1:30004" in hub and "nats-route://127.0.0.1:30005" in hub
    assert "nats-route://127.0.0.1:30003" not in hub  # not to itself
    assert 'domain: "hub"' in hub
    topology = load_topology(topology_dir)
    for name, entry in topology.identities.items():
        assert entry.public_key in hub  # every client and every leaf is a user of every hub node
        assert (entry.public_key in leaf) == (name == "aws")  # a leaf knows only its own cloud


def test_generate_refuses_to_overwrite(topology_dir):
    with pytest.raises(ConfigError, match="already holds a topology"):
        generate(TopologyConfig(clouds=CLOUDS, job=JOB, out=topology_dir, base_port=30000))


def test_client_certificates_are_written_per_identity(tmp_path):
    topology = generate(TopologyConfig(clouds=("aws",), job=JOB, out=tmp_path, observers=(), client_certs=True))
    entry = topology.identities["aws"]
    assert entry.cert == tmp_path / "identities" / "aws" / "client.pem"
    assert entry.key is not None and stat.S_IMODE(entry.key.stat().st_mode) == 0o600
    assert "verify: true" in (tmp_path / "servers" / "leaf-aws" / "nats.conf").read_text()
    assert topology.client_auth("aws").connect_kwargs()["tls"].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    "options",
    [
        {"clouds": ()},
        {"clouds": ("aws", "aws")},
        {"clouds": ("coordinator",)},
        {"clouds": ("aws",), "observers": ("aws",)},
        {"clouds": ("a.b",)},
        {"clouds": ("aws",), "job": "x y"},
        {"clouds": ("aws",), "hub_size": 0},
        {"clouds": ("aws",), "base_port": 65530},
        {"clouds": ("aws",), "host": "bad host"},
        {"clouds": ("aws",), "jetstream_domain": "a.b"},
    ],
)
def test_topology_config_rejects_mistakes(tmp_path, options):
    with pytest.raises(ConfigError):
        TopologyConfig(**{"job": JOB, "out": tmp_path, **options})


def test_port_layout():
    config = TopologyConfig(clouds=CLOUDS, job=JOB, out=Path("unused"), base_port=100, hub_size=3)
    assert [config.hub_ports(i) for i in range(3)] == [(100, 103, 106), (101, 104, 107), (102, 105, 108)]
    assert [config.leaf_port(c) for c in CLOUDS] == [109, 110, 111]
    assert config.port_count == 12 and config.replicas == 3


def test_render_quotes_subjects_and_never_writes_an_empty_allow_list():
    text = render({"a": {"allow": ["$JS.API.>"]}, "nkey": Raw("$seed"), "on": True, "n": 3})
    assert '"$JS.API.>"' in text and "nkey: $seed" in text and "on: true" in text and "n: 3" in text
    body = user_block(User(public_key="U", permissions=Permissions(publish=(), subscribe=("x",))))
    assert body["permissions"]["publish"] == {"deny": [">"]}


def _seed_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = write_secret(tmp_path / "me" / "user.nk", new_user_seed())
    os.chmod(path, mode)
    return path


def test_client_auth_builds_nats_connect_arguments(tmp_path, topology_dir):
    seed = _seed_file(tmp_path)
    kwargs = ClientAuth(nkey=str(seed), tls_ca=str(topology_dir / "ca" / "ca.pem")).connect_kwargs()
    assert kwargs["nkeys_seed"] == str(seed)
    assert kwargs["inbox_prefix"] == inbox_prefix(public_key_of_seed(seed.read_bytes()))
    assert isinstance(kwargs["tls"], ssl.SSLContext) and kwargs["tls"].verify_mode == ssl.CERT_REQUIRED
    assert ClientAuth().connect_kwargs() == {}


def test_client_auth_rejects_mistakes(tmp_path):
    seed = _seed_file(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        ClientAuth(nkey=str(seed), creds=str(seed))
    with pytest.raises(ConfigError, match="no such file"):
        ClientAuth(nkey=str(tmp_path / "missing.nk"))
    with pytest.raises(ConfigError, match="readable by others"):
        ClientAuth(nkey=str(_seed_file(tmp_path / "loose", 0o644)))
    with pytest.raises(ConfigError, match="needs its key"):
        ClientAuth(tls_cert=str(seed))
    junk = write_secret(tmp_path / "junk" / "user.nk", b"not a seed")
    with pytest.raises(ConfigError, match="not an NKEY seed"):
        ClientAuth(nkey=str(junk))
