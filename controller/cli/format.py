"""How the commands show things: tables, sizes, ages and durations, phase colours."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.table import Table
from rich.text import Text

PHASE_STYLE = {
    "Succeeded": "green",
    "Passed": "green",
    "Healthy": "green",
    "Progressing": "cyan",
    "Baking": "cyan",
    "Applying": "cyan",
    "Running": "cyan",
    "Pending": "white",
    "Paused": "yellow",
    "Deferred": "yellow",
    "Reverting": "magenta",
    "Failed": "red",
    "RolledBack": "red",
    "Aborted": "red",
}
SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def make_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def plain_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Like ``make_table``, but cells are plain text: messages such as ``[berlin/n1]``
    are not rich markup."""
    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in row))
    return t


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: str | None, *, now: datetime | None = None) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d."""
    at = _parse_time(value)
    if at is None:
        return "<never>"
    seconds = max(0, int(((now or datetime.now(UTC)) - at).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def when(value: str | None) -> str:
    at = _parse_time(value)
    if at is None:
        return "<none>"
    return f"{at.strftime('%Y-%m-%d %H:%M:%S')} ({age(value)} ago)"


def duration(seconds: float | None) -> str:
    """Seconds as a Go-style duration, the form manifests use: 0s, 90s -> 1m30s, 2h."""
    if seconds is None:
        return ""
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    if rest == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def counts(states: dict[str, int] | None) -> str:
    if not states:
        return ""
    return " ".join(f"{k}={v}" for k, v in sorted(states.items()))


def styled(value: str) -> Text:
    return Text(value, style=PHASE_STYLE.get(value, ""))


def nodes_done(states: dict[str, int]) -> int:
    """Nodes that run the new version: Running (waiting for its numbers) or Healthy."""
    return states.get("Healthy", 0) + states.get("Running", 0)


def percent(done: int, total: int) -> int:
    return 100 if total == 0 else done * 100 // total


def wave_label(r: dict[str, Any]) -> str:
    """A rollout's current wave of all waves, counted from 1: ``2/3``."""
    waves = int(r.get("waves") or 0)
    return f"{min(int(r.get('current_wave') or 0) + 1, waves) if waves else 0}/{waves}"
