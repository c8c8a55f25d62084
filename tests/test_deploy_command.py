"""``fedjet deploy nats`` as the CLI will call it: flags in, a topology and per-recipient folders out."""

from __future__ import annotations

import argparse
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedjet.broker.auth import ClientAuth
from fedjet.broker.server import find_nats_server
from fedjet.deploy import load_topology
from fedjet.deploy.command import add_arguments, deploy_command, write_bundles
from fedjet.errors import ConfigError
from fedjet.keystore import coordinator_boxes, member_boxes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_with_keys_each_identity_gets_only_its_own_secrets(tmp_path, capsys):
    out = tmp_path / "deploy"
    args = parse("--clouds", "aws,gcp", "--job", "j", "--out", str(out), "--base-port", "30000", "--with-keys")
    assert deploy_command(args) == 0
    printed = capsys.readouterr().out
    assert "nats-server -c" in printed and "--nkey DIR/user.nk" in printed and "'hub'" in printed
    ids = out / "identities"
    assert sorted(p.name for p in (ids / "gcp").iterdir()) == ["coordinator.pub", "gcp.key", "user.nk"]
    assert sorted(p.name for p in (ids / "eval").iterdir()) == ["coordinator.pub", "eval.key", "user.nk"]
    assert mode(ids / "gcp" / "gcp.key") == 0o600 and mode(ids / "gcp" / "coordinator.pub") == 0o644
    assert member_boxes(ids / "aws", "aws").me.name == "aws"
    coordinator = coordinator_boxes(ids / "coordinator", ["aws", "gcp", "eval"])
    # one key set: what aws holds as coordinator.pub is the coordinator's real public key
    assert bytes(member_boxes(ids / "aws", "aws").public_of("coordinator").box) == bytes(coordinator.me.public.box)
    assert not [p for p in ids.iterdir() if p.name.startswith(".")]  # the scratch folder is gone
    topology = load_topology(out)
    ClientAuth(nkey=str(ids / "aws" / "user.nk"), tls_ca=str(topology.ca))  # usable as is


def test_bundles_copy_each_part_with_its_mode_and_never_the_ca_key(tmp_path):
    out, bundles = tmp_path / "deploy", tmp_path / "bundles"
    deploy_command(
        parse("--clouds", "aws", "--job", "j", "--out", str(out), "--hub-size", "1", "--bundles", str(bundles))
    )
    assert sorted(p.name for p in (bundles / "ca").iterdir()) == ["ca.pem"]
    assert sorted(p.name for p in (bundles / "servers").iterdir()) == ["hub-0", "leaf-aws"]
    assert sorted(p.name for p in (bundles / "identities").iterdir()) == ["aws", "coordinator", "eval"]
    assert mode(bundles / "servers" / "leaf-aws" / "leaf-seed.conf") == 0o600
    assert mode(bundles / "identities" / "aws" / "user.nk") == 0o600
    with pytest.raises(ConfigError, match="not empty"):
        write_bundles(load_topology(out), bundles)


def test_bundled_server_configs_are_accepted_by_nats_server(tmp_path):
    out = tmp_path / "deploy"
    deploy_command(parse("--clouds", "aws", "--job", "j", "--out", str(out), "--hub-size", "1"))
    for server in load_topology(out).servers:
        result = subprocess.run(
            [find_nats_server(), "-t", "-c", str(server.config)], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr + result.stdout


def test_if_missing_leaves_an_existing_topology_and_any_namespace_like_object_works(tmp_path, capsys):
    out = tmp_path / "deploy"
    minimal = SimpleNamespace(clouds="aws,gcp", job="j", out=str(out))  # optional flags take defaults
    assert deploy_command(minimal) == 0
    before = (out / "topology.json").read_bytes()
    assert deploy_command(SimpleNamespace(clouds=("aws",), job="j", out=str(out), if_missing=True)) == 0
    assert "leaving it" in capsys.readouterr().out and (out / "topology.json").read_bytes() == before
    with pytest.raises(ConfigError, match="already holds a topology"):
        deploy_command(minimal)
