"""How ``fedjet status`` looks: one ``rich`` table, or one JSON object off a pipe (``--json``)."""

from __future__ import annotations

import datetime as dt
import json as jsonlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedjet.observe.status import JobStatus

DASH = "-"


def render_status(status: JobStatus) -> Table:
    """A row per cloud under a title that says the version and a caption with the counters."""
    table = Table(title=_title(status), caption=_caption(status), caption_justify="left")
    columns = ("cloud", "link", "last update", "staleness", "behind", "sent", "tokens/s", "idle", "up", "down", "ε")
    for column in columns:
        table.add_column(column, justify="left" if column == "cloud" else "right")
    for cloud in status.clouds:
        stats = cloud.stats
        table.add_row(
            cloud.cloud,
            _link(cloud.link),
            DASH if cloud.last_version is None else f"v{cloud.last_version}",
            _int(cloud.staleness),
            _int(cloud.behind),
            _int(stats.get("updates_sent")),
            _num(stats.get("tokens_per_s"), "{:,.0f}"),
            _num(stats.get("idle_frac"), "{:.0%}"),
            mb(stats.get("bytes_up")),
            mb(stats.get("bytes_down")),
            _num(stats.get("dp_epsilon"), "{:.3g}"),  # a DP job's privacy spent so far
        )
    return table


def print_status(status: JobStatus, json: bool = False, console: Console | None = None) -> None:
    """The table on a terminal, or ``--json``: one JSON object on one line."""
    if json:
        text = jsonlib.dumps(status.to_dict(), sort_keys=True)
        if console is None:
            print(text, flush=True)
        else:
            console.out(text, highlight=False)
        return
    (console or Console()).print(render_status(status))


def _link(link: Mapping[str, Any] | None) -> str:
    """Island mode: "up", or "island 42s" (since the hub last heard from the leaf) and what waits."""
    if link is None:
        return DASH
    if link["link"] == "up":
        return "up"
    since = link.get("since_contact_s")
    waiting = "" if link.get("lag") is None else f", {link['lag']} msgs waiting"
    return f"island {DASH if since is None else f'{since:.0f}s'}{waiting}"


def _title(status: JobStatus) -> str:
    head = status.head
    if head is None:
        return f"job {status.job}: no verified global version"
    final = ", final" if head.final else ""
    return f"job {status.job}: version {head.version}{final} ({head.hash[:12]})"


def _caption(status: JobStatus) -> str:
    lines = []
    record = status.record
    if record is not None:
        when = dt.datetime.fromtimestamp(record.published_unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(
            f"{record.strategy}: {record.applied_total} applied, {record.rejected_total} rejected"
            f"{_reasons(record.rejected)}; published {when}"
        )
    for stream in (status.updates, status.globals):
        if stream is not None:
            lines.append(f"{stream.name}: {stream.messages} messages, {mb(stream.bytes)}")
    lines += [f"note: {note}" for note in status.notes]
    return "\n".join(lines)


def _reasons(rejected: Mapping[str, int]) -> str:
    if not rejected:
        return ""
    return " (" + ", ".join(f"{reason} {n}" for reason, n in sorted(rejected.items())) + ")"


def _int(value: Any) -> str:
    return DASH if value is None else str(int(value))


def _num(value: Any, fmt: str) -> str:
    return DASH if value is None else fmt.format(float(value))


def mb(value: Any) -> str:
    return DASH if value is None else f"{int(value) / 1e6:.3f} MB"
