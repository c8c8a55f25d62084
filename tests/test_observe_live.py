"""The live view of ``fedjet up``: rendered to an in-memory terminal, absent off a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.text import Text

from fedjet.codecs.record import ContributionRecord, VersionRecord
from fedjet.errors import ConfigError
from fedjet.observe.live import LiveView
from fedjet.report import RoundRecord


def round_record(version: int, contributors: list[str], staleness: list[int], eval_loss: float | None) -> RoundRecord:
    return RoundRecord(
        round=version,
        version=version,
        train_loss=None,
        eval_loss=eval_loss,
        eval_ppl=None if eval_loss is None else 2.718**eval_loss,
        eval_acc=None if eval_loss is None else 0.25,
        bytes_up=1000 * len(contributors),
        bytes_down=0,
        wall_s=1.5 * version,
        round_s=1.5,
        hash="ab" * 32,
        contributors=contributors,
        staleness=staleness,
        applied_total=2 * version,
        rejected_total=1 if version >= 2 else 0,
    )


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100, color_system=None), out


def last_frame(out: io.StringIO) -> str:
    """What the terminal shows at the end: the plain text after the last redraw."""
    plain = Text.from_ansi(out.getvalue()).plain
    return plain[plain.rfind("fedjet up: job") :]


def test_live_view_shows_progress_clouds_staleness_bytes_and_eval_loss():
    console, out = terminal()
    view = LiveView(job="demo", clouds=("aws", "gcp", "azure"), target_versions=5, console=console)
    view.update(round_record(0, [], [], 5.5))
    contributions = tuple(
        ContributionRecord(cloud=c, seq=1, stream_seq=i, base=0, staleness=0, samples=8, loss=2.0, wire_bytes=250_000)
        for i, c in enumerate(("aws", "gcp"))
    )
    view.update(
        round_record(1, ["aws", "gcp"], [0, 0], None), VersionRecord(strategy="async", contributions=contributions)
    )
    view.update(round_record(2, ["aws"], [1], 3.25))
    view.close()
    view.close()  # safe twice
    frame = last_frame(out)
    assert "version 2" in frame and "applied 4" in frame and "rejected 1" in frame
    assert "2/5 versions" in frame
    assert "eval loss 3.2500 at v2" in frame and "(from 5.5000)" in frame and "acc 25.0%" in frame
    rows = {
        line.split()[0]: line.split()
        for line in frame.splitlines()
        if line.split()[:1] in (["aws"], ["gcp"], ["azure"])
    }
    assert rows["aws"][1:4] == ["2", "v2", "1"]  # two applied, last in v2, one version stale
    assert rows["aws"][4:] == ["0.250", "MB"]
    assert rows["gcp"][1:4] == ["1", "v1", "0"]
    assert rows["azure"][1:] == ["0", "-", "-", "-"]


def test_progress_counts_updates_when_the_job_stops_at_max_updates():
    console, out = terminal()
    with LiveView(job="demo", clouds=("aws",), target_updates=15, console=console) as view:
        view.update(round_record(3, ["aws"], [0], None))
    assert "6/15 updates" in last_frame(out)


def test_no_live_view_off_a_terminal_and_none_without_a_target(capsys):
    assert LiveView.for_terminal(job="demo", clouds=("aws",), target_versions=5, target_updates=None) is None
    with pytest.raises(ConfigError):
        LiveView(job="demo", clouds=("aws",), console=terminal()[0])
