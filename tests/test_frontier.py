"""``fedjet bench frontier`` on a small workload: real runs, the table, the plot, the ratios."""

from __future__ import annotations

import json

import pytest

from fedjet.bench.frontier import FrontierConfig, describe, eval_every, job_for, rows_of, run
from fedjet.errors import ConfigError
from fedjet.models.build import initial_model, parameter_tensors

pytestmark = pytest.mark.e2e


def test_frontier_runs_both_dense_references_and_every_cell_for_every_seed(tmp_path, data_dir):
    config = FrontierConfig(
        out=tmp_path / "frontier", codecs=("dense", "int1+down",), rounds=1, local_steps=2, seq_len=64,
        data=str(data_dir), eval_tokens=1024,
    )  # fmt: skip
    result = run(config, log=lambda _: None)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["dense (fedavg)", "dense (nesterov)", "int1+down=int1 (sgd)"]  # dense once per optimizer
    saved = json.loads((tmp_path / "frontier" / "results.json").read_text())
    assert len(saved["runs"]) == 3 * 3 and {r["seed"] for r in saved["runs"]} == {0, 1, 2}
    for row in rows.values():  # a row is its three seeds' runs, not one of them
        runs = [r["report"]["summary"] for r in saved["runs"] if r["cell"]["codec"] == row["codec"]
                and r["cell"]["server"] == row["server"]]  # fmt: skip
        assert sorted(row["final_eval_losses"]) == sorted(r["final_eval_loss"] for r in runs)
        assert row["socket_bytes"] == pytest.approx(sum(r["socket_bytes"] for r in runs) / 3)
        assert row["socket_bytes"] > row["bytes_up"] + row["bytes_down"]  # the protocol and the exact versions too
    # the reference is the better dense run, whichever optimizer that was on this workload
    references = [rows["dense (fedavg)"], rows["dense (nesterov)"]]
    best = min(references, key=lambda r: r["final_eval_loss"])
    assert [r["best_reference"] for r in result["rows"]] == [r is best for r in result["rows"]]
    model = initial_model("tiny", vocab_size=257, eos_id=256, seed=0)
    numel = sum(t.numel() for t in parameter_tensors(model).values())
    small = rows["int1+down=int1 (sgd)"]
    assert best["bytes_up"] >= 3 * 4 * numel  # three float32 updates crossed
    assert 0 < small["bytes_up"] < best["bytes_up"] / 10  # 1-bit values against float32
    assert small["socket_bytes"] < best["socket_bytes"]
    table = (tmp_path / "frontier" / "frontier.md").read_text()
    assert table.strip() == describe(result) and "`int1+down=int1 (sgd)`" in table and " ± " in table
    assert (tmp_path / "frontier" / "frontier.png").stat().st_size > 10_000


def fake_run(codec: str, server: str, seed: int, loss: float, socket: int) -> dict:
    """A run's report as far as the frontier reads it."""
    summary = {"initial_eval_loss": 5.0, "final_eval_loss": loss, "bytes_up": socket // 4, "bytes_down": socket // 4,
               "socket_bytes": socket, "versions": 3, "wall_s": 1.0, "peak_up_mb_s": 1.0}  # fmt: skip
    cell = {"codec": codec, "schedule": "wait", "server": server}
    cell |= {"server_lr": 1.0, "server_momentum": 0.0} if server == "fedavg" else {}
    cell |= {"server_lr": 0.7, "server_momentum": 0.9} if server == "nesterov" else {}
    if server not in ("fedavg", "nesterov"):
        cell |= {"server_lr": None, "server_momentum": 0.9}
    report = {"summary": summary, "clouds": {"aws": {"idle_frac": 0.5}}, "rounds": []}
    return {"cell": cell, "seed": seed, "report": report}


@pytest.mark.parametrize(("codec_losses", "beats"), [((2.80, 2.81, 2.79), False), ((2.60, 2.61, 2.59), True)])
def test_a_codec_beats_the_reference_only_by_more_than_the_spread(tmp_path, codec_losses, beats):
    config = FrontierConfig(out=tmp_path, codecs=("int8",))
    runs = [fake_run("dense", "fedavg", s, loss, 1000) for s, loss in enumerate((3.0, 2.9, 2.8))]
    runs += [fake_run("dense", "nesterov", s, loss, 1000) for s, loss in enumerate((3.1, 3.0, 3.2))]
    runs += [fake_run("int8", "sgd", s, loss, 100) for s, loss in enumerate(codec_losses)]
    rows = {r["name"]: r for r in rows_of(runs, config)}
    assert rows["dense (fedavg)"]["best_reference"] and not rows["dense (nesterov)"]["best_reference"]
    codec = rows["int8 (sgd)"]
    assert codec["final_eval_loss"] < rows["dense (fedavg)"]["final_eval_loss"]  # lower in both cases ...
    assert codec["beats_reference"] is beats  # ... a win only when the gap is larger than the spread (0.1)
    assert codec["reduction"] == pytest.approx(10.0)


def test_fewer_than_three_seeds_or_a_missing_seed_fail(tmp_path):
    with pytest.raises(ConfigError, match="at least 3 distinct --seeds"):
        FrontierConfig(out=tmp_path, codecs=("int8",), seeds=(0, 0, 1))
    config = FrontierConfig(out=tmp_path, codecs=("int8",))
    runs = [fake_run("dense", server, s, 3.0, 1000) for server in ("fedavg", "nesterov") for s in range(3)]
    runs += [fake_run("int8", "sgd", s, 3.0, 100) for s in range(2)]  # seed 2 never ran
    with pytest.raises(ValueError, match="not \\(0, 1, 2\\)"):
        rows_of(runs, config)


def test_a_bad_codec_is_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError):
        FrontierConfig(out=tmp_path, codecs=("dense", "topk:2"))


def test_schedules_make_rows_per_codec_and_a_meaningless_one_fails_before_any_run(tmp_path):
    config = FrontierConfig(out=tmp_path, codecs=("int2",), schedules=("wait", "overlap"), link="20mbit/80ms")
    assert config.rows == (("dense", "wait"), ("dense", "wait"), ("int2", "wait"), ("int2", "overlap"))
    with pytest.raises(ConfigError, match="--schedule overlap"):
        FrontierConfig(out=tmp_path, codecs=("int2",), schedules=("overlap",), strategy="async")
    with pytest.raises(ConfigError, match="--schedules"):
        FrontierConfig(out=tmp_path, codecs=("int2",), schedules=("eager",))
    with pytest.raises(ConfigError, match="--link"):
        FrontierConfig(out=tmp_path, codecs=("int2",), link="fast")


def test_fragments_make_rows_at_the_same_update_bytes_and_bad_values_fail_before_any_run(tmp_path):
    config = FrontierConfig(out=tmp_path, codecs=("int8",), fragments=(1, 4), rounds=5, local_steps=20)
    names = [c.name for c in config.cells]
    assert names == ["dense (fedavg)", "dense (nesterov)", "int8 (sgd)", "dense (sgd, F=4)", "int8 (sgd, F=4)"]
    whole, split = config.cells[0], config.cells[3]
    one, four = job_for(config, whole, 0, 0), job_for(config, split, 3, 0)
    assert (four.train.fragments, four.stop.rounds, four.train.local_steps) == (4, 20, 20)
    per_round = four.train.local_steps // four.train.fragments  # a fragment round trains H / F steps
    assert one.stop.rounds * one.train.local_steps == four.stop.rounds * per_round  # the same steps and bytes
    assert (eval_every(whole), eval_every(split)) == (1, 4)  # evaluated once per whole model's worth of versions
    with pytest.raises(ConfigError, match="--fragments"):
        FrontierConfig(out=tmp_path, codecs=("int8",), fragments=(3,), local_steps=20)
    with pytest.raises(ConfigError, match="fragments"):  # fragments run in synchronous rounds only
        FrontierConfig(out=tmp_path, codecs=("int8",), fragments=(1, 4), strategy="async")
