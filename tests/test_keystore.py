"""Keys made where they are used: ``fedjet keys generate --cloud NAME`` writes one party's pair
and ``fedjet keys add`` takes only others' public keys, never a secret, never over a different key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedjet.cli import main
from fedjet.codecs import crypto
from fedjet.errors import ConfigError
from fedjet.keystore import coordinator_boxes, generate_one, load_public, member_boxes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def keys(*argv: str | Path) -> int:
    return main(["keys", *map(str, argv)])


def test_each_party_makes_only_its_own_pair_and_takes_the_others_public_keys(tmp_path, capsys):
    machines = {name: tmp_path / name for name in ("coordinator", "aws", "gcp")}
    assert keys("generate", "--coordinator", "--out", machines["coordinator"]) == 0
    for cloud in ("aws", "gcp"):
        assert keys("generate", "--cloud", cloud, "--out", machines[cloud]) == 0
        assert names(machines[cloud]) == [f"{cloud}.key", f"{cloud}.pub"]  # nobody else's secret
        assert mode(machines[cloud] / f"{cloud}.key") == 0o600
    assert "hand out" in capsys.readouterr().out
    pubs = {name: machines[name] / f"{name}.pub" for name in machines}
    assert keys("add", pubs["coordinator"], pubs["gcp"], "--out", machines["aws"]) == 0
    assert keys("add", pubs["aws"], pubs["gcp"], "--out", machines["coordinator"]) == 0
    assert names(machines["aws"]) == ["aws.key", "aws.pub", "coordinator.pub", "gcp.pub"]
    assert keys("add", pubs["gcp"], "--out", machines["aws"]) == 0  # the same key again: nothing to do
    assert "0 public key(s) added" in capsys.readouterr().out
    assert keys("generate", "--cloud", "aws", "--out", machines["aws"], "--if-missing") == 0
    assert "leaving them" in capsys.readouterr().out
    coordinator = coordinator_boxes(machines["coordinator"], ["aws", "gcp"])
    envelope = crypto.seal_update(b"frame", member_boxes(machines["aws"], "aws"))  # signed by aws's own key
    assert crypto.open_update(envelope, coordinator, 1 << 20) == ("aws", bytearray(b"frame"))


def test_keys_add_refuses_a_secret_a_non_key_a_renamed_key_and_a_different_key(tmp_path, capsys):
    mine, theirs, again = tmp_path / "mine", tmp_path / "theirs", tmp_path / "again"
    generate_one(mine, "aws")
    generate_one(theirs, "gcp")
    generate_one(again, "gcp")  # gcp's key made a second time: a different key of the same name
    junk = tmp_path / "junk" / "azure.pub"
    junk.parent.mkdir()
    junk.write_text('{"fedjet_pub": 1, "name": "azure", "box_public": "00", "verify": "zz"}')
    renamed = tmp_path / "renamed" / "azure.pub"
    renamed.parent.mkdir()
    renamed.write_bytes((theirs / "gcp.pub").read_bytes())
    disguised = tmp_path / "disguised" / "gcp.pub"
    disguised.parent.mkdir()
    disguised.write_bytes((theirs / "gcp.key").read_bytes())
    cases = [
        ([theirs / "gcp.key"], "is a secret key"),
        ([disguised], "is a secret key"),  # a secret by content, whatever the file is called
        ([theirs / "gcp.pub", junk], "not a fedjet public key"),  # all or nothing: gcp.pub is not added
        ([renamed], "name it gcp.pub"),
        ([theirs / "gcp.pub", again / "gcp.pub"], "two different public keys"),
        ([mine / "aws.pub", theirs / "gcp.pub", tmp_path / "absent.pub"], "not found"),
    ]
    for files, why in cases:
        assert keys("add", *files, "--out", mine) == 2, why
        assert why in capsys.readouterr().err
        assert names(mine) == ["aws.key", "aws.pub"], why
    assert keys("add", theirs / "gcp.pub", "--out", mine) == 0
    before = (mine / "gcp.pub").read_bytes()
    assert keys("add", again / "gcp.pub", "--out", mine) == 2
    assert "holds a different key" in capsys.readouterr().err and (mine / "gcp.pub").read_bytes() == before
    (mine / "aws.pub").unlink()  # only the secret is left: its public half still decides
    generate_one(tmp_path / "other-aws", "aws")
    assert keys("add", tmp_path / "other-aws" / "aws.pub", "--out", mine) == 2
    assert "holds a different key" in capsys.readouterr().err and names(mine) == ["aws.key", "gcp.pub"]


def test_a_public_key_file_must_hold_the_key_it_is_named_for(tmp_path):
    generate_one(tmp_path, "aws")
    (tmp_path / "gcp.pub").write_bytes((tmp_path / "aws.pub").read_bytes())  # aws's key, filed as gcp's
    with pytest.raises(ConfigError, match="holds 'aws'"):
        load_public(tmp_path, "gcp")
    assert load_public(tmp_path, "aws").name == "aws"
    with pytest.raises(ConfigError, match="its owner hands it out; fedjet keys add"):  # what to do about it
        load_public(tmp_path, "azure")


def test_the_clouds_form_still_writes_every_pair_for_one_operator(tmp_path):
    assert keys("generate", "--clouds", "aws,gcp", "--out", tmp_path) == 0
    expected = [f"{n}.{s}" for n in ("aws", "coordinator", "eval", "gcp") for s in ("key", "pub")]
    assert names(tmp_path) == expected
    with pytest.raises(SystemExit):  # one party, or all of them: not both
        main(["keys", "generate", "--cloud", "aws", "--clouds", "aws,gcp", "--out", str(tmp_path)])
