"""HTML of the dashboard's pages, from plain values: the endpoints read the database,
these only render (and escape every value that came from a user or a node).

No assets and no framework: tables, CSS bars and inline SVG, and one small inline
script that swaps in the page's body as the server sends it again (server-sent events,
controller/dashboard/live.py); without script, the page reloads itself. A fleet of 10,000
nodes reads as a few dozen rows, one per site, each a bar of its nodes' health."""

from __future__ import annotations

import base64
import hashlib
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

# The live page's script: the body of <main> is replaced by each "page" event of the
# stream named in its data-stream. A stream refused (503, too many open) or failing for
# good leaves the page to reload itself; a "gone" event (the object was deleted) reloads
# it at once, to its 404.
LIVE_SCRIPT = """(() => {
const main = document.getElementById("live");
const status = document.getElementById("live-status");
const es = new EventSource(main.dataset.stream);
es.addEventListener("page", (e) => { main.innerHTML = e.data; status.textContent = "live"; });
es.addEventListener("gone", () => { es.close(); location.reload(); });
es.onerror = () => {
  status.textContent = "reconnecting";
  if (es.readyState === EventSource.CLOSED) setTimeout(() => location.reload(), 10000);
};
})();"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(LIVE_SCRIPT.encode()).digest()).decode()

# Pages are never framed (clickjacking) and run no script but their own: any markup a
# node or a user managed to get into a page could not run one.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
}


def tag(text: str) -> str:
    return f'<span class="tag">{escape(text)}</span>'


def page(title: str, body: str, *, live: str | None = None) -> str:
    """A whole page. ``live``: the path of the stream that sends its body again as it
    changes (without script, the page reloads every 5 s instead)."""
    head = (
        '<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{STYLE}</style>"
    )
    if live is None:
        return f"{head}</head><body>{body}</body></html>"
    return (
        f'{head}<noscript><meta http-equiv="refresh" content="5"></noscript></head><body>'
        '<div class="muted" id="nav"><a href="/">fleet</a> · <a href="/docs">API</a> · '
        '<a href="/metrics">metrics</a> · <span id="live-status">connecting</span></div>'
        f'<main id="live" data-stream="{escape(live)}">{body}</main>'
        f"<script>{LIVE_SCRIPT}</script></body></html>"
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
    """One row per site, each linked to its nodes."""
    legend = "".join(f'<span class="h-{h}"></span>{h}' for h in HEALTH_ORDER)
    rows = []
    for (cluster, site), counts in health.items():
        cells = "".join(f"<td>{counts.get(h, 0)}</td>" for h in HEALTH_ORDER)
        site_href = f"{page_path('clusters', cluster)}?site={quote(site, safe='')}"
        rows.append(
            f'<tr><td>{cluster_link(cluster)}</td><td><a href="{site_href}">'
            f"{escape(site) or '-'}</a></td><td>{sum(counts.values())}</td>"
            f"<td>{health_bar(counts)}</td>{cells}</tr>"
        )
    return f'<div class="legend muted">{legend}</div>' + table(
        "sites", ("Cluster", "Site", "Nodes", "Health", *HEALTH_ORDER), rows
    )


def page_path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def rollout_link(name: str) -> str:
    return f'<a href="{page_path("rollouts", name)}">{escape(name)}</a>'


def cluster_link(name: str) -> str:
    return f'<a href="{page_path("clusters", name)}">{escape(name)}</a>'


def model_link(name: str, text: str | None = None) -> str:
    return f'<a href="{page_path("models", name)}">{escape(text or name)}</a>'


def node_link(cluster: str, node: str) -> str:
    return f'<a href="{page_path("clusters", cluster, "nodes", node)}">{escape(node)}</a>'


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _num(value: Any, fmt: str = "g") -> str:
    return format(float(value), fmt) if isinstance(value, int | float) else ""


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


@dataclass(frozen=True)
class AssignmentView:
    """One node's workload of one model: from the node's side (model, rollout) or the
    rollout's (cluster, node)."""

    cluster: str
    node: str
    model: str
    wave: int | None
    rollout: str | None
    state: str
    desired: str | None
    observed: str | None
    metrics: Mapping[str, Any]
    message: str | None
    updated_at: datetime


@dataclass(frozen=True)
class NodeView:
    name: str
    health: str
    site: str
    architecture: str | None
    last_heartbeat_at: datetime | None


@dataclass(frozen=True)
class VersionView:
    version: str
    format: str
    size_bytes: int
    status: str
    sha256: str
    benchmark: Mapping[str, Any]
    parent: str | None
    method: str | None
    created_at: datetime


@dataclass(frozen=True)
class OptimizationView:
    id: int
    parent: str
    target: str
    method: str
    status: str
    stage: str | None
    message: str | None
    report: Mapping[str, Any]


@dataclass(frozen=True)
class BenchmarkView:
    version: str
    node_class: str
    node: str
    status: str
    result: Mapping[str, Any]
    finished_at: datetime | None


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
    width, height, left, bar = 110 * len(points) + 60, 160, 40, 28
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
        x = left + 110 * i
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


def rollout_body(
    *,
    name: str,
    model: str,
    version: str,
    phase: str,
    message: str | None,
    waves: Sequence[WaveView],
    versions: Mapping[str, int],
    events: Sequence[EventView],
    nodes: Sequence[AssignmentView],
    node_total: int,
) -> str:
    """A rollout: its waves and their nodes' states, the gate's evidence at each decision
    against its thresholds, its nodes with their numbers, the events."""
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
    return (
        f'<h1 class="p-{escape(phase)}">{escape(name)} {tag(phase)}</h1>'
        f"<div>{model_link(model)}:{escape(version)} · versions planned: {mix}</div>"
        f"<div class=muted>{escape(message or '')}</div>"
        "<h2>Waves</h2>"
        + table("waves", ("Wave", "Phase", "Nodes", "States", "Started", "Finished"), wave_rows)
        + "<h2>Gate evidence</h2>"
        + gate_plot(decisions)
        + "<h2>Nodes</h2>"
        + assignment_table("nodes", nodes, node_total, by_node=True)
        + "<h2>Events</h2>"
        + table("events", ("Time", "Reason", "By", "Message", "Evidence"), event_rows)
    )


def assignment_table(
    table_id: str, rows: Sequence[AssignmentView], total: int, *, by_node: bool
) -> str:
    """Workloads with the numbers their node reports: one per node of a rollout
    (``by_node``), or one per model of a node."""
    first = ("Node", "Wave") if by_node else ("Model", "Rollout")
    body = []
    for a in rows:
        if by_node:
            cells = f"<td>{node_link(a.cluster, a.node)}</td><td>{'' if a.wave is None else a.wave}</td>"
        else:
            cells = f"<td>{model_link(a.model)}</td><td>{rollout_link(a.rollout) if a.rollout else ''}</td>"
        m = a.metrics
        body.append(
            f"<tr>{cells}<td>{tag(a.state)}</td><td>{escape(a.desired or '')}</td>"
            f"<td>{escape(a.observed or '')}</td><td>{_num(m.get('p95_ms'))}</td>"
            f"<td>{_num(m.get('error_rate'), '.4f')}</td><td>{_when(a.updated_at)}</td>"
            f"<td class=muted>{escape(a.message or '')}</td></tr>"
        )
    header = (*first, "State", "Desired", "Observed", "p95 ms", "Error rate", "Updated", "Message")
    more = f'<p class="muted">and {total - len(rows)} more</p>' if total > len(rows) else ""
    return table(table_id, header, body) + more


def model_body(
    *,
    name: str,
    description: str | None,
    versions: Sequence[VersionView],
    optimizations: Sequence[OptimizationView],
    benchmarks: Sequence[BenchmarkView],
) -> str:
    """A model: its versions (format, size, status, lineage, measured latency), the
    comparison report and verdict of each optimization, the benchmarks per node class."""
    version_rows = [
        f'<tr id="v-{escape(v.version)}"><td>{escape(v.version)}</td><td>{escape(v.format)}</td>'
        f'<td data-bytes="{v.size_bytes}">{human_bytes(v.size_bytes)}</td><td>{tag(v.status)}</td>'
        f"<td>{_num(v.benchmark.get('p50_ms'))}</td><td>{_num(v.benchmark.get('p95_ms'))}</td>"
        f"<td>{escape(v.parent or '')}</td><td>{escape(v.method or '')}</td>"
        f"<td>{_when(v.created_at)}</td><td class=muted>{v.sha256[:12]}</td></tr>"
        for v in versions
    ]
    optimization_rows = []
    for o in optimizations:
        r = o.report
        verdict = r.get("verdict") or {}
        if not verdict:
            said = escape(o.message or o.stage or "")
        elif verdict.get("recommended"):
            said = "recommended"
        else:
            said = "not recommended: " + escape("; ".join(verdict.get("reasons") or []))
        latency = r.get("latency_ratio") or {}
        optimization_rows.append(
            f"<tr><td>{o.id}</td><td>{escape(o.parent)} → {escape(o.target)}</td>"
            f"<td>{escape(o.method)}</td><td>{tag(o.status)}</td>"
            f"<td>{_num(r.get('size_ratio'))}</td><td>{_num(latency.get('p50'))}</td>"
            f"<td>{_num(r.get('top1_agreement'))}</td><td>{_num(r.get('max_abs_error'))}</td>"
            f"<td>{said}</td></tr>"
        )
    benchmark_rows = [
        f"<tr><td>{escape(b.version)}</td><td>{escape(b.node_class)}</td><td>{escape(b.node)}</td>"
        f"<td>{tag(b.status)}</td><td>{_num(b.result.get('p50_ms'))}</td>"
        f"<td>{_num(b.result.get('p95_ms'))}</td><td>{_when(b.finished_at)}</td></tr>"
        for b in benchmarks
    ]
    return (
        f"<h1>{escape(name)}</h1><div class=muted>{escape(description or '')}</div>"
        "<h2>Versions</h2>"
        + table(
            "versions",
            (
                "Version",
                "Format",
                "Size",
                "Status",
                "p50 ms",
                "p95 ms",
                "Parent",
                "Method",
                "Created",
                "sha256",
            ),
            version_rows,
        )
        + "<h2>Optimizations</h2>"
        + table(
            "optimizations",
            (
                "Job",
                "Variant",
                "Method",
                "Status",
                "Size ratio",
                "p50 ratio",
                "Top-1 agreement",
                "Max abs error",
                "Verdict",
            ),
            optimization_rows,
        )
        + "<h2>Benchmarks per node class</h2>"
        + table(
            "benchmarks",
            ("Version", "Node class", "Measured on", "Status", "p50 ms", "p95 ms", "Finished"),
            benchmark_rows,
        )
    )


def node_body(
    *,
    cluster: str,
    name: str,
    health: str,
    last_heartbeat_at: datetime | None,
    architecture: str | None,
    labels: Mapping[str, Any],
    workloads: Sequence[AssignmentView],
    events: Sequence[EventView],
) -> str:
    """A node: its health and last heartbeat, what it runs with the latency and error
    rate it reports for each, and its history (the events of the node)."""
    labels_text = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"
    event_rows = [
        f"<tr><td>{_when(e.time)}</td><td>{escape(e.reason)}</td>"
        f"<td>{escape(e.actor or 'controller')}</td><td>{escape(e.message)}</td></tr>"
        for e in events
    ]
    return (
        f"<h1>{escape(name)} {tag(health)}</h1>"
        f"<div>cluster {escape(cluster)} · {escape(architecture or 'unknown architecture')} · "
        f'last heartbeat <span id="heartbeat">{_when(last_heartbeat_at) or "never"}</span></div>'
        f"<div class=muted>{escape(labels_text)}</div>"
        "<h2>Workloads</h2>"
        + assignment_table("workloads", workloads, len(workloads), by_node=False)
        + "<h2>History</h2>"
        + table("history", ("Time", "Reason", "By", "Message"), event_rows)
    )


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


def cluster_body(
    *,
    name: str,
    driver: str,
    status: str,
    message: str | None,
    site: str | None,
    nodes: Sequence[NodeView],
    total: int,
) -> str:
    """A cluster's nodes (of one site), each linked to its page."""
    rows = [
        f"<tr><td>{node_link(name, n.name)}</td><td>{tag(n.health)}</td>"
        f"<td>{escape(n.site)}</td><td>{escape(n.architecture or '')}</td>"
        f"<td>{_when(n.last_heartbeat_at) or 'never'}</td></tr>"
        for n in nodes
    ]
    more = f'<p class="muted">and {total - len(nodes)} more</p>' if total > len(nodes) else ""
    scope = f" · site {escape(site) or '-'}" if site is not None else ""
    return (
        f"<h1>{escape(name)} {tag(status)}</h1>"
        f"<div>{escape(driver)} · {total} node(s){scope}</div>"
        f"<div class=muted>{escape(message or '')}</div><h2>Nodes</h2>"
        + table("nodes", ("Node", "Health", "Site", "Architecture", "Last heartbeat"), rows)
        + more
    )
