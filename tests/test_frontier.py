"""``fedjet bench frontier`` on a small workload: real runs, the table, the plot, the ratios."""

from __future__ import annotations

import json

import pytest

from fedjet.bench.frontier import FrontierConfig, describe, run
from fedjet.errors import ConfigError
from fedjet.models.build import initial_model, parameter_tensors

pytestmark = pytest.mark.e2e


def test_frontier_runs_dense_first_and_writes_the_table_and_the_plot(tmp_path, data_dir):
    config = FrontierConfig(
        out=tmp_path / "frontier", codecs=("int1+down",), rounds=1, local_steps=3, seq_len=64, data=str(data_dir),
        eval_tokens=2048,
    )  # fmt: skip
    result = run(config, log=lambda _: None)
    rows = {r["codec"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "int1+down=int1"]
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    numel = sum(t.numel() for t in parameter_tensors(model).values())
    dense, small = rows["dense"], rows["int1+down=int1"]
    assert dense["bytes"] >= 3 * 4 * numel  # three float32 updates crossed (plus what the workers read)
    assert 0 < small["bytes"] < dense["bytes"] / 10  # 1-bit values against float32, both ways
    assert small["final_eval_loss"] < small["initial_eval_loss"]
    table = (tmp_path / "frontier" / "frontier.md").read_text()
    assert table.strip() == describe(result) and "`int1+down=int1`" in table
    assert (tmp_path / "frontier" / "frontier.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "frontier" / "results.json").read_text())
    assert [r["codec"] for r in saved["runs"]] == ["dense", "int1+down=int1"]


def test_a_bad_codec_is_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError):
        FrontierConfig(out=tmp_path, codecs=("dense", "topk:2"))


def test_schedules_make_rows_per_codec_and_a_meaningless_one_fails_before_any_run(tmp_path):
    config = FrontierConfig(out=tmp_path, codecs=("int2",), schedules=("wait", "overlap"), link="20mbit/80ms")
    assert config.rows == (("dense", "wait"), ("dense", "overlap"), ("int2", "wait"), ("int2", "overlap"))
    with pytest.raises(ConfigError, match="--schedule overlap"):
        FrontierConfig(out=tmp_path, codecs=("int2",), schedules=("overlap",), strategy="async")
    with pytest.raises(ConfigError, match="--schedules"):
        FrontierConfig(out=tmp_path, codecs=("int2",), schedules=("eager",))
    with pytest.raises(ConfigError, match="--link"):
        FrontierConfig(out=tmp_path, codecs=("int2",), link="fast")
