"""The config tree: one source of defaults, two front doors (flags and job.toml), typed wire."""

from __future__ import annotations

import argparse

import pytest

from fedjet.cli import build_parser
from fedjet.config.flags import add_config_flags, config_from_args, job_config, to_toml
from fedjet.config.job import DEFAULT_ROUNDS, JobConfig, StrategyConfig
from fedjet.config.wire import WireError, from_wire, to_wire
from fedjet.errors import ConfigError
from fedjet.spec import JobSpec
from tests.conftest import REPO, run_fedjet

EXAMPLE = REPO / "examples" / "job.toml"
EXAMPLE_FLAGS = [
    "--job", "example", "--clouds", "aws,gcp,azure", "--observers", "eval", "--model", "tiny", "--seed", "0",
    "--codec", "lowrank:24+int4+down=lowrank:16+int4", "--strategy", "fedavg", "--max-staleness", "8",
    "--server-opt", "sgd", "--late", "drop", "--local-steps", "20", "--batch-size", "8", "--seq-len", "128",
    "--lr", "0.002", "--partition", "fixed", "--rounds", "3",
]  # fmt: skip


def parse(*argv: str) -> JobConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))


def test_the_example_file_is_the_same_job_as_the_equivalent_flags():
    assert parse("--config", str(EXAMPLE)) == parse(*EXAMPLE_FLAGS)


def test_flags_override_the_file_and_the_rest_of_the_file_stays():
    job = parse("--config", str(EXAMPLE), "--rounds", "7", "--strategy", "async")
    assert job.stop.rounds == 7 and job.strategy.name == "async"
    assert job.job == "example" and job.train.local_steps == 20


def test_the_default_server_lr_lives_with_the_strategy_not_the_cli():
    assert StrategyConfig(name="gradient").server.lr == 0.05  # built in code, no CLI involved
    assert StrategyConfig(name="fedavg").server.lr == 1.0
    assert parse("--strategy", "gradient", "--server-lr", "0.3").strategy.server.lr == 0.3


def test_rounds_default_is_set_once_and_max_updates_alone_means_no_round_limit():
    assert JobConfig().stop.rounds == DEFAULT_ROUNDS
    only_updates = parse("--max-updates", "9").stop
    assert only_updates.rounds is None and only_updates.max_updates == 9


def test_toml_written_for_the_coordinator_parses_back_to_the_same_tree(tmp_path):
    job = parse("--strategy", "fedbuff", "--buffer-size", "2", "--quorum", "2", "--round-deadline", "4.5")
    path = tmp_path / "job.toml"
    path.write_text(to_toml(job))
    assert job_config(path) == job


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"codec": "bogus"}, "codec stage"),
        ({"strategy": {"name": "median"}}, "--strategy"),
        ({"strategy": {"nmae": "fedavg"}}, "unknown key"),
        ({"train": {"local_steps": "many"}}, "expected int"),
        ({"train": {"lr": True}}, "boolean"),
        ({"round": {"quorum": 4}}, "quorum"),
        ({"clouds": ["aws", "aws"]}, "unique"),
        ({"clouds": ["coordinator"]}, "reserved"),
        ({"stop": {"rounds": 0}}, "rounds"),
    ],
)
def test_every_bad_value_is_a_config_error_naming_it(overrides, match):
    with pytest.raises(ConfigError, match=match):
        job_config(overrides=overrides)


def test_a_bad_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("job = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        job_config(bad)
    with pytest.raises(ConfigError, match="No such file"):
        job_config(tmp_path / "missing.toml")


def test_wire_decoding_tolerates_unknown_keys_and_checks_types():
    raw = {**to_wire(JobConfig(job="j")), "from_a_newer_peer": 1}
    assert from_wire(JobConfig, raw).job == "j"
    with pytest.raises(WireError, match="unknown key"):
        from_wire(JobConfig, raw, strict=True)
    with pytest.raises(WireError, match="expected a list"):
        from_wire(JobConfig, {"clouds": "aws"})


def test_the_spec_carries_the_config_typed_and_reads_the_first_batch_layout():
    spec = JobSpec(config=JobConfig(job="j", strategy=StrategyConfig(name="dynamic")), model_config={"a": 1})
    assert JobSpec.from_bytes(spec.to_bytes()) == spec
    v1 = (
        b'{"spec_version": 1, "job": "old", "clouds": ["aws"], "model_config": {}, '
        b'"train": {"local_steps": 3, "batch_size": 2, "seq_len": 16, "lr": 0.01}, "codec": "dense", '
        b'"strategy": "fedavg", "strategy_config": {"name": "fedavg", "server": {"name": "sgd", "lr": 1.0}}, '
        b'"partition": "noniid", "alpha": 0.3}'
    )
    old = JobSpec.from_bytes(v1)
    assert old.job == "old" and old.config.train.local_steps == 3 and old.config.partition.scheme == "noniid"


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--codec", "bogus"],
        ["up", "--slowdown", "azure=abc"],
        ["up", "--slowdown", "nowhere=2"],
        ["up", "--quorum", "5"],
        ["up", "--config", "no-such-file.toml"],
    ],
)
def test_a_wrong_flag_fails_before_any_process_starts(argv):
    result = run_fedjet(*argv, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("fedjet: error:") and "Traceback" not in result.stderr
    assert "nats-server" not in result.stdout  # nothing was started


def test_every_job_flag_of_the_cli_sets_a_field_of_the_tree():
    up = build_parser()._subparsers._group_actions[0].choices["up"]
    dests = {a.dest for a in up._actions if a.dest.startswith("cfg__")}
    assert {"cfg__strategy__name", "cfg__strategy__staleness__kind", "cfg__stop__rounds", "cfg__train__lr"} <= dests


def test_help_shows_values_a_person_would_write_never_the_config_path():
    from tests.conftest import run_fedjet

    shown = run_fedjet("up", "--help").stdout
    assert "CFG__" not in shown and "cfg__" not in shown
    assert "--server-lr LR" in shown and "--clouds NAME,..." in shown and "--dp epsilon=E,delta=D,clip=C" in shown


def test_mini_language_fields_are_parsed_once_into_typed_values_and_stay_strings_on_the_wire():
    from fedjet.config.job import JobConfig
    from fedjet.config.wire import from_wire, to_wire
    from fedjet.errors import ConfigError

    job = JobConfig(codec="topk:0.01+int8", peft="lora:r=4", dp="epsilon=8,delta=1e-5,clip=1",
                    secure_agg=None)  # fmt: skip
    assert job.codec_spec.density == 0.01 and job.peft_spec.r == 4 and job.dp_config.epsilon == 8.0
    wire = to_wire(job)
    assert {"codec_spec", "peft_spec", "dp_config", "secure_agg_config"}.isdisjoint(wire)
    again = from_wire(JobConfig, wire)
    assert again == job and again.peft_spec == job.peft_spec and again.codec_spec == job.codec_spec
    with pytest.raises(ConfigError, match="--peft"):
        JobConfig(peft="lora:r=0")  # refused when the config is built, before any process starts
