"""HTML of the dashboard's pages, from plain values: the endpoints read the database,
these only render (and escape every value that came from a user or a node).

No JavaScript and no assets: tables, CSS bars and inline SVG. A fleet of 10,000 nodes
reads as a few dozen rows, one per site, each a bar of its nodes' health."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2330;background:#f6f7f9}
h1{margin:0 0 .2rem}h2{margin-top:2rem}table{border-collapse:collapse;width:100%;background:#fff}
td,th{padding:.4rem .6rem;border-bottom:1px solid #e3e6ea;text-align:left;font-size:.9rem}
th{background:#eef0f3}.bar{background:#e3e6ea;height:.8rem;width:12rem;border-radius:.4rem;overflow:hidden;display:flex}
.fill{background:#2f9e44;height:100%}.p-RolledBack .fill,.p-Failed .fill,.p-Aborted .fill{background:#e03131}
.tag{padding:.1rem .45rem;border-radius:.6rem;font-size:.8rem;background:#e7f5ff}
.p-Succeeded .tag{background:#d3f9d8}.p-RolledBack .tag,.p-Failed .tag{background:#ffe3e3}
.muted{color:#6b7280;font-size:.85rem}td:first-child,td:nth-child(2){white-space:nowrap}
.h-Ready{background:#2f9e44}.h-Stale{background:#f59f00}.h-Offline{background:#e03131}
.h-NotReady{background:#c2255c}.h-Unknown{background:#adb5bd}
.legend span{display:inline-block;width:.7rem;height:.7rem;border-radius:.2rem;margin:0 .2rem 0 .6rem}
a{color:#1c7ed6;text-decoration:none}svg text{font-size:11px;fill:#495057}
"""

HEALTH_ORDER = ("Ready", "Stale", "NotReady", "Offline", "Unknown")

# Pages are never framed (clickjacking).
PAGE_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}


def tag(text: str) -> str:
    return f'<span class="tag">{escape(text)}</span>'


def page(title: str, body: str, *, refresh_s: int = 2) -> str:
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{refresh_s}"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def table(table_id: str, header: Sequence[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(rows)}</table>'


def health_bar(counts: Mapping[str, int]) -> str:
    """A stacked bar of node health, widths in proportion; its title says the numbers."""
    total = sum(counts.values())
    if not total:
        return '<div class="bar"></div>'
    parts = "".join(
        f'<div class="h-{h}" style="width:{100 * counts[h] / total:.2f}%"></div>'
        for h in HEALTH_ORDER
        if counts.get(h)
    )
    label = ", ".join(f"{h} {counts[h]}" for h in HEALTH_ORDER if counts.get(h))
    return f'<div class="bar" title="{escape(label)}">{parts}</div>'


def sites(health: Mapping[tuple[str, str], Mapping[str, int]]) -> str:
    legend = "".join(f'<span class="h-{h}"></span>{h}' for h in HEALTH_ORDER)
    rows = []
    for (cluster, site), counts in health.items():
        cells = "".join(f"<td>{counts.get(h, 0)}</td>" for h in HEALTH_ORDER)
        rows.append(
            f"<tr><td>{escape(cluster)}</td><td>{escape(site) or '<span class=muted>-</span>'}"
            f"</td><td>{sum(counts.values())}</td><td>{health_bar(counts)}</td>{cells}</tr>"
        )
    return f'<div class="legend muted">{legend}</div>' + table(
        "sites", ("Cluster", "Site", "Nodes", "Health", *HEALTH_ORDER), rows
    )


def rollout_link(name: str) -> str:
    return f'<a href="/rollouts/{quote(name, safe="")}">{escape(name)}</a>'


@dataclass(frozen=True)
class WaveView:
    index: int
    phase: str
    nodes: int
    states: Mapping[str, int]
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class EventView:
    time: datetime
    reason: str
    message: str
    actor: str | None
    data: Mapping[str, Any]


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}" if at else ""


def gate_plot(decisions: Sequence[EventView]) -> str:
    """The gate's evidence at each decision against its thresholds, as inline SVG: per
    decided wave, the slowest node's p95 next to maxP95LatencyMs (the dashed line), and
    the healthy ratio next to minHealthyRatio."""
    points = [
        (int(e.data.get("wave", 0)), e.reason, e.data.get("gate") or {})
        for e in decisions
        if isinstance(e.data.get("gate"), dict)
    ]
    if not points:
        return '<p class="muted">No gate decision yet.</p>'
    width, height, left, bar = 90 * len(points) + 60, 160, 40, 28
    limit = next(
        (
            float(g["limits"]["maxP95LatencyMs"])
            for _, _, g in points
            if (g.get("limits") or {}).get("maxP95LatencyMs") is not None
        ),
        None,
    )
    observed = [float(g["max_p95_ms"]) for _, _, g in points if g.get("max_p95_ms") is not None]
    top = max([*observed, limit or 0.0, 1e-9]) * 1.15
    scale = (height - 30) / top
    shapes = []
    for i, (wave, reason, g) in enumerate(points):
        x = left + 90 * i
        p95 = g.get("max_p95_ms")
        colour = "#2f9e44" if reason == "GatePassed" else "#e03131"
        if p95 is not None:
            h = float(p95) * scale
            shapes.append(
                f'<rect class="p95" data-wave="{wave}" data-p95="{float(p95):g}" x="{x}" '
                f'y="{height - 20 - h:.1f}" width="{bar}" height="{h:.1f}" fill="{colour}">'
                f"<title>wave {wave}: slowest p95 {float(p95):g} ms</title></rect>"
            )
        ratio = float(g.get("healthy_ratio", 0.0))
        shapes.append(
            f'<text x="{x}" y="{height - 5}">w{wave} {escape(reason[4:].lower())} '
            f"{ratio:.0%}</text>"
        )
    if limit is not None:
        y = height - 20 - limit * scale
        shapes.append(
            f'<line class="limit" data-limit="{limit:g}" x1="{left - 10}" x2="{width}" '
            f'y1="{y:.1f}" y2="{y:.1f}" stroke="#1d2330" stroke-dasharray="4 3"/>'
            f'<text x="0" y="{y - 3:.1f}">{limit:g} ms</text>'
        )
    return (
        f'<svg id="gate-plot" width="{width}" height="{height}" role="img" '
        f'aria-label="gate evidence per wave">{"".join(shapes)}</svg>'
        '<p class="muted">Bars: the slowest healthy-or-not node p95 at each gate decision '
        "(green passed, red failed); dashed: maxP95LatencyMs; under each, the healthy ratio.</p>"
    )


def rollout_page(
    *,
    name: str,
    model: str,
    version: str,
    phase: str,
    message: str | None,
    waves: Sequence[WaveView],
    versions: Mapping[str, int],
    events: Sequence[EventView],
) -> str:
    wave_rows = [
        f'<tr class="p-{escape(w.phase)}"><td>{w.index}</td><td>{tag(w.phase)}</td>'
        f"<td>{w.nodes}</td><td>{health_bar_states(w.states)}"
        f"<span class=muted>{escape(', '.join(f'{k} {v}' for k, v in sorted(w.states.items())))}"
        f"</span></td><td>{_when(w.started_at)}</td><td>{_when(w.finished_at)}</td></tr>"
        for w in waves
    ]
    mix = ", ".join(f"{escape(v)} on {n} node(s)" for v, n in versions.items()) or "-"
    decisions = [e for e in reversed(events) if e.reason in ("GatePassed", "GateFailed")]
    event_rows = [
        f"<tr><td>{_when(e.time)}</td><td>{escape(e.reason)}</td>"
        f"<td>{escape(e.actor or 'controller')}</td><td>{escape(e.message)}</td>"
        f"<td class=muted>{escape(_evidence(e.data))}</td></tr>"
        for e in events
    ]
    body = (
        f'<div class=muted><a href="/">fleet</a> / rollouts</div>'
        f'<h1 class="p-{escape(phase)}">{escape(name)} {tag(phase)}</h1>'
        f"<div>{escape(model)}:{escape(version)} · versions planned: {mix}</div>"
        f"<div class=muted>{escape(message or '')}</div>"
        "<h2>Waves</h2>"
        + table("waves", ("Wave", "Phase", "Nodes", "States", "Started", "Finished"), wave_rows)
        + "<h2>Gate evidence</h2>"
        + gate_plot(decisions)
        + "<h2>Events</h2>"
        + table("events", ("Time", "Reason", "By", "Message", "Evidence"), event_rows)
    )
    return page(f"edgefleet: {name}", body)


_STATE_HEALTH = {
    "Healthy": "Ready",
    "Running": "Stale",
    "Applying": "Unknown",
    "Pending": "Unknown",
    "Failed": "Offline",
    "Deferred": "NotReady",
    "RolledBack": "Unknown",
}


def health_bar_states(states: Mapping[str, int]) -> str:
    """A wave's node states as the health bar's colours: Healthy green, Running amber,
    Failed red, Deferred purple, the rest grey."""
    merged: dict[str, int] = {}
    for state, n in states.items():
        key = _STATE_HEALTH.get(state, "Unknown")
        merged[key] = merged.get(key, 0) + n
    return health_bar(merged)


def _evidence(data: Mapping[str, Any]) -> str:
    gate = data.get("gate")
    if isinstance(gate, dict):
        p95 = gate.get("max_p95_ms")
        return (
            f"healthy {gate.get('healthy', 0)}/{gate.get('nodes', 0)}"
            + (f", slowest p95 {p95:g} ms" if isinstance(p95, int | float) else "")
            + (f", silent {gate['silent']}" if gate.get("silent") else "")
        )
    nodes = data.get("nodes")
    if isinstance(nodes, list) and nodes:
        more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
        return ", ".join(str(n) for n in nodes[:5]) + more
    return ""
