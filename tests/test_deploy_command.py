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
from fedjet.codecs import crypto
from fedjet.codecs.crypto import COORDINATOR
from fedjet.deploy import load_topology
from fedjet.deploy.command import add_arguments, deploy_command, write_bundles
from fedjet.errors import ConfigError
from fedjet.keystore import coordinator_boxes, generate_one, load_identity, load_public, member_boxes
from fedjet.secagg import wire


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
    gcp = ["aws.pub", "coordinator.pub", "gcp.key", "gcp.pub", "user.nk"]  # every cloud's .pub: --secure-agg
    assert sorted(p.name for p in (ids / "gcp").iterdir()) == gcp
    assert sorted(p.name for p in (ids / "eval").iterdir()) == ["coordinator.pub", "eval.key", "eval.pub", "user.nk"]
    assert "made on this machine" in printed  # says whose secrets it held
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


def secure_agg_keys(folder: Path, cloud: str, clouds: tuple[str, ...]):
    """What a worker loads from its --keys folder for --secure-agg (fedjet.worker.daemon): its
    own boxes, and every cloud's verify key, its own included."""
    return member_boxes(folder, cloud), {c: load_public(folder, c).verify for c in clouds}


def test_a_secure_agg_member_started_from_its_bundle_alone_loads_every_key_it_needs(tmp_path):
    out, bundles, clouds = tmp_path / "deploy", tmp_path / "bundles", ("aws", "gcp", "azure")
    argv = ["--clouds", ",".join(clouds), "--job", "j", "--out", str(out), "--hub-size", "1", "--with-keys"]
    deploy_command(parse(*argv, "--bundles", str(bundles)))
    ids = bundles / "identities"
    coordinator = coordinator_boxes(ids / COORDINATOR, [*clouds, "eval"])
    for cloud in clouds:
        folder = ids / cloud
        assert [p.name for p in folder.glob("*.key")] == [f"{cloud}.key"]  # no one else's secret
        boxes, verify_keys = secure_agg_keys(folder, cloud, clouds)
        body = wire.canonical("advert", "j", 1, cloud)
        signature = wire.sign(body, boxes.me.sign)
        for other in clouds:  # each other member checks this member's signed messages with its bundle
            wire.verify(body, signature, secure_agg_keys(ids / other, other, clouds)[1][cloud], cloud)
        assert set(verify_keys) == set(clouds)
        update = crypto.seal_update(b"frame of " + cloud.encode(), boxes)  # signed with the bundle's key
        assert crypto.open_update(update, coordinator, 1 << 20) == (cloud, bytearray(b"frame of " + cloud.encode()))


def test_public_keys_deploys_the_parties_own_public_keys_and_no_secret(tmp_path, capsys):
    clouds = ("aws", "gcp")
    machines = {name: tmp_path / "machines" / name for name in (COORDINATOR, *clouds, "eval")}
    handed_out = tmp_path / "handed-out"
    handed_out.mkdir()
    for name, machine in machines.items():  # each party makes its own pair and hands out its .pub
        generate_one(machine, name)
        (handed_out / f"{name}.pub").write_bytes((machine / f"{name}.pub").read_bytes())
    out, bundles = tmp_path / "deploy", tmp_path / "bundles"
    argv = ["--clouds", ",".join(clouds), "--job", "j", "--out", str(out), "--hub-size", "1"]
    assert deploy_command(parse(*argv, "--public-keys", str(handed_out), "--bundles", str(bundles))) == 0
    assert "made on this machine" not in capsys.readouterr().out
    ids = bundles / "identities"
    assert not list(ids.rglob("*.key")) and not list((out / "identities").rglob("*.key"))
    assert sorted(p.name for p in (ids / "gcp").glob("*.pub")) == ["aws.pub", "coordinator.pub", "gcp.pub"]
    for name, machine in machines.items():  # each machine adds its own secret to its bundle
        (ids / name / f"{name}.key").write_bytes((machine / f"{name}.key").read_bytes())
        (ids / name / f"{name}.key").chmod(0o600)
    coordinator = coordinator_boxes(ids / COORDINATOR, [*clouds, "eval"])
    boxes, verify_keys = secure_agg_keys(ids / "aws", "aws", clouds)
    assert bytes(verify_keys["gcp"]) == bytes(load_identity(machines["gcp"], "gcp").sign.verify_key)
    assert crypto.open_update(crypto.seal_update(b"f", boxes), coordinator, 1 << 20)[0] == "aws"
    (handed_out / "gcp.pub").unlink()
    with pytest.raises(ConfigError, match=r"lacks gcp\.pub"):
        deploy_command(parse("--clouds", "aws,gcp", "--job", "j", "--out", str(tmp_path / "d2"),
                             "--public-keys", str(handed_out)))  # fmt: skip
    with pytest.raises(SystemExit):  # one or the other: argparse refuses both
        parse(*argv, "--with-keys", "--public-keys", str(handed_out))


def test_leaf_hosts_give_each_leaf_its_own_host_and_a_bad_pair_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "t"
    args = parse("--clouds", "aws,gcp", "--job", "j", "--out", str(out), "--host", "hub.example.org",
                 "--leaf-hosts", "aws=leaf.aws.example.org")  # fmt: skip
    assert deploy_command(args) == 0
    topology = load_topology(out)
    assert "leaf.aws.example.org" in topology.urls_for("aws")[0] and "hub.example.org" in topology.urls_for("gcp")[0]
    for bad in ("aws", "aws=h,aws=h2", "=h"):
        with pytest.raises(SystemExit):
            parse("--clouds", "aws", "--job", "j", "--out", str(tmp_path / "x"), "--leaf-hosts", bad)
    with pytest.raises(ConfigError, match="not one of the clouds"):
        deploy_command(parse("--clouds", "aws", "--job", "j", "--out", str(tmp_path / "y"), "--leaf-hosts", "gcp=h"))
    assert not (tmp_path / "y" / "topology.json").exists()


def test_public_keys_missing_a_party_fail_before_anything_is_written(tmp_path):
    collected = tmp_path / "collected"
    generate_one(collected, "aws")
    generate_one(collected, COORDINATOR)
    out = tmp_path / "t"
    with pytest.raises(ConfigError, match=r"lacks gcp\.pub"):
        deploy_command(parse("--clouds", "aws,gcp", "--job", "j", "--out", str(out), "--observers", "eval",
                             "--public-keys", str(collected)))  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
