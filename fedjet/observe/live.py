"""The live view of ``fedjet up`` on a terminal: progress, each cloud's state, the eval loss.

It redraws one ``rich`` block in place each time the observer records a version. Off a
terminal (CI, a pipe, a log file) there is no live view at all: :meth:`LiveView.for_terminal`
returns None and ``fedjet up`` keeps printing one plain line per round, so logs stay greppable.
The view only renders what it is handed; it never reads the broker itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedjet.codecs.record import VersionRecord
from fedjet.errors import ConfigError
from fedjet.observe.status_view import mb
from fedjet.report import RoundRecord

DASH = "-"


@dataclass
class _CloudState:
    applied: int = 0
    last_version: int | None = None
    staleness: int | None = None
    bytes_up: int = 0


class LiveView:
    """``update(round_record)`` after each recorded version; ``close()`` leaves the last frame."""

    def __init__(
        self,
        *,
        job: str,
        clouds: Sequence[str],
        target_versions: int | None = None,
        target_updates: int | None = None,
        console: Console | None = None,
    ) -> None:
        if target_versions is None and target_updates is None:
            raise ConfigError("the live view needs a target: versions (--rounds) or updates (--max-updates)")
        self.job = job
        self.target_versions = target_versions
        self.target_updates = target_updates
        self.clouds = {cloud: _CloudState() for cloud in clouds}
        self.last: RoundRecord | None = None
        self.initial_loss: float | None = None
        self.latest_loss: RoundRecord | None = None  # the newest record that was evaluated
        self._live = Live(self.renderable(), console=console, auto_refresh=False, transient=False)
        self._live.start(refresh=True)
        self._closed = False

    @classmethod
    def for_terminal(
        cls, *, job: str, clouds: Sequence[str], target_versions: int | None, target_updates: int | None
    ) -> LiveView | None:
        """A live view when stdout is a terminal, else None (plain lines instead)."""
        if not sys.stdout.isatty():
            return None
        return cls(job=job, clouds=clouds, target_versions=target_versions, target_updates=target_updates)

    def update(self, record: RoundRecord, version_record: VersionRecord | None = None) -> None:
        """Fold in one recorded version; ``version_record`` (when at hand) adds per-cloud bytes."""
        self.last = record
        if record.eval_loss is not None:
            self.latest_loss = record
            if self.initial_loss is None:
                self.initial_loss = record.eval_loss
        for cloud, staleness in zip(record.contributors, record.staleness, strict=False):
            state = self.clouds.setdefault(cloud, _CloudState())
            state.applied += 1
            state.last_version, state.staleness = record.version, staleness
        if version_record is not None:
            for contribution in version_record.contributions:
                self.clouds.setdefault(contribution.cloud, _CloudState()).bytes_up += contribution.wire_bytes
        if not self._closed:
            self._live.update(self.renderable(), refresh=True)

    def close(self) -> None:
        """Stop redrawing (the last frame stays on screen); safe to call twice."""
        if not self._closed:
            self._closed = True
            self._live.stop()

    def __enter__(self) -> LiveView:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def renderable(self) -> RenderableType:
        return Group(self._headline(), self._progress(), self._loss_line(), self._cloud_table())

    def _headline(self) -> Text:
        last = self.last
        if last is None:
            return Text(f"fedjet up: job {self.job}, waiting for version 0", style="bold")
        tail = f"  {last.wall_s:.1f}s  applied {last.applied_total}  rejected {last.rejected_total}"
        return Text(f"fedjet up: job {self.job}, version {last.version}{tail}", style="bold")

    def _progress(self) -> Table:
        done, total, unit = self._done_total()
        bar = ProgressBar(total=float(total), completed=float(min(done, total)), width=40)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(bar, Text(f"{done}/{total} {unit}"))
        return grid

    def _done_total(self) -> tuple[int, int, str]:
        """Versions toward ``--rounds``, or applied updates toward ``--max-updates``."""
        last = self.last
        if self.target_versions is not None:
            return (last.version if last else 0), self.target_versions, "versions"
        assert self.target_updates is not None
        return (last.applied_total if last else 0), self.target_updates, "updates"

    def _loss_line(self) -> Text:
        latest = self.latest_loss
        if latest is None or latest.eval_loss is None:
            return Text("eval loss -")
        parts = [f"eval loss {latest.eval_loss:.4f} at v{latest.version}"]
        if latest.eval_ppl is not None:
            parts.append(f"ppl {latest.eval_ppl:.2f}")
        if latest.eval_acc is not None:
            parts.append(f"acc {100 * latest.eval_acc:.1f}%")
        if self.initial_loss is not None and latest.round > 0:
            parts.append(f"(from {self.initial_loss:.4f})")
        return Text("  ".join(parts))

    def _cloud_table(self) -> Table:
        table = Table(box=None, pad_edge=False)
        for column in ("cloud", "applied", "last update", "staleness", "up"):
            table.add_column(column, justify="left" if column == "cloud" else "right")
        for cloud, state in self.clouds.items():
            table.add_row(
                cloud,
                str(state.applied),
                DASH if state.last_version is None else f"v{state.last_version}",
                DASH if state.staleness is None else str(state.staleness),
                mb(state.bytes_up) if state.bytes_up else DASH,
            )
        return table
