"""``edgefleet describe rollout|cluster|node``: one resource in detail, with its events."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.text import Text

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import client_error, fail
from controller.cli.format import (
    age,
    counts,
    duration,
    nodes_done,
    percent,
    plain_table,
    styled,
    wave_label,
    when,
)
from controller.cli.options import ApiUrl, EventsOpt, OutputOpt
from controller.cli.output import Output, console, emit

describe_app = typer.Typer(help="Show one resource in detail.", no_args_is_help=True)


def _selector(sel: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for req in sel.get("matchExpressions") or []:
        values = ",".join(req.get("values") or [])
        parts.append(f"{req['key']} {req['operator']}" + (f" ({values})" if values else ""))
    if sel.get("clusters"):
        parts.append(f"clusters in ({', '.join(sel['clusters'])})")
    return ", ".join(parts) or "<all nodes>"


def _strategy(strategy: dict[str, Any]) -> str:
    steps = []
    for step in strategy.get("steps") or []:
        size = f"{step['percent']}%" if "percent" in step else f"{step.get('nodes')} node(s)"
        bake = step.get("bake", "0s")
        steps.append(size if bake in ("0s", "0", "") else f"{size} (bake {bake})")
    limits = ", ".join(
        f"{k} {strategy[k]}"
        for k in ("maxUnavailable", "maxDeferred", "progressDeadline")
        if k in strategy
    )
    return " -> ".join(steps) + (f"; {limits}" if limits else "")


def _describe_view(d: dict[str, Any]) -> Group:
    spec = d.get("spec") or {}
    total = sum((d.get("states") or {}).values())
    fields: list[tuple[str, str | Text]] = [
        ("Name", d["name"]),
        ("Generation", str(d["generation"])),
        ("Phase", styled(d["phase"])),
        ("Message", d.get("message") or ""),
        ("Model", f"{d['model']}:{d['version']}"),
        ("Selector", _selector(spec.get("selector") or {})),
        ("Strategy", _strategy(spec.get("strategy") or {})),
        ("Gates", " ".join(f"{k}={v}" for k, v in (spec.get("gates") or {}).items())),
        ("On failure", str(spec.get("onFailure", "rollback"))),
        ("Created", when(d.get("created_at"))),
        ("Started", when(d.get("started_at"))),
        ("Finished", when(d.get("finished_at"))),
        ("Wave", wave_label(d)),
        ("Nodes", f"{total} ({counts(d.get('states'))})" if total else "0"),
    ]
    versions = d.get("versions") or {}
    if len(versions) > 1 or spec.get("model", {}).get("variants"):
        fields.insert(5, ("Variants", counts(versions)))
    parts = _field_lines(fields)
    parts.append(Text("Waves:"))
    waves = plain_table(
        ["WAVE", "PHASE", "NODES", "DONE", "BAKE", "STATES", "STARTED", "BAKED", "FINISHED"],
        [
            [
                w["index"],
                styled(w["phase"]),
                w["nodes"],
                f"{percent(nodes_done(w.get('states') or {}), w['nodes'])}%",
                duration(w.get("bake_s")),
                counts(w.get("states")),
                age(w.get("started_at")) if w.get("started_at") else "",
                age(w.get("baked_at")) if w.get("baked_at") else "",
                age(w.get("finished_at")) if w.get("finished_at") else "",
            ]
            for w in d.get("wave_detail") or []
        ],
    )
    parts.append(Padding(waves, (0, 0, 0, 2), expand=False))
    parts.extend(_events_lines(d.get("events") or []))
    return Group(*parts)


def _field_lines(fields: list[tuple[str, str | Text]]) -> list[RenderableType]:
    lines: list[RenderableType] = []
    for key, value in fields:
        line = Text(f"{key + ':':<13} ")
        line.append(value if isinstance(value, Text) else Text(value))
        lines.append(line)
    return lines


def _events_lines(events: list[dict[str, Any]]) -> list[RenderableType]:
    """The events table, newest first, as the API lists them."""
    if not events:
        return [Text("Events:"), Text("  <none>")]
    table = plain_table(
        ["AGE", "TIME", "REASON", "BY", "MESSAGE"],
        [
            [
                age(e["time"]),
                str(e["time"])[:19],
                e["reason"],
                e.get("actor") or "controller",
                e["message"],
            ]
            for e in events
        ],
    )
    return [Text("Events:"), Padding(table, (0, 0, 0, 2), expand=False)]


@describe_app.command("rollout")
def describe_rollout(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    events: EventsOpt = 10,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Describe a rollout: phase, spec summary, waves with node state counts, events."""
    client = ApiClient(api_url)
    try:
        detail = client.get(f"/v1/rollouts/{name}")
        if events != 10:
            detail["events"] = client.get(f"/v1/rollouts/{name}/events", limit=events)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    if output is Output.table:
        console.print(_describe_view(detail))
    else:
        emit(detail, output)


describe_app.command("rollouts", hidden=True)(describe_rollout)


def _labels(labels: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "<none>"


def _fetch(api_url: str | None, path: str, kind: str, name: str, events: int) -> dict[str, Any]:
    client = ApiClient(api_url)
    try:
        found: dict[str, Any] = client.get(path)
        found["events"] = client.get("/v1/events", kind=kind, name=name, limit=events)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    return found


@describe_app.command("cluster")
def describe_cluster(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    events: EventsOpt = 10,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Describe a cluster: driver, status, node health, its events."""
    c = _fetch(api_url, f"/v1/clusters/{name}", "Cluster", name, events)
    if output is not Output.table:
        emit(c, output)
        return
    total = sum((c.get("nodes") or {}).values())
    fields: list[tuple[str, str | Text]] = [
        ("Name", c["name"]),
        ("Driver", c["driver"]),
        ("Generation", str(c["generation"])),
        ("Status", styled(c["status"])),
        ("Message", c.get("message") or ""),
        ("Labels", _labels(c.get("labels"))),
        ("Server", c.get("server") or "<none>"),
        ("Namespace", c.get("namespace") or "<none>"),
        ("Credentials", "yes" if c.get("has_credentials") else "no"),
        ("Nodes", f"{total} ({counts(c.get('nodes'))})" if total else "0"),
        ("Last sync", when(c.get("last_sync_at"))),
        ("Created", when(c.get("created_at"))),
    ]
    console.print(Group(*_field_lines(fields), *_events_lines(c["events"])))


@describe_app.command("node")
def describe_node(
    target: Annotated[str, typer.Argument(help="CLUSTER/NODE.")],
    events: EventsOpt = 10,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Describe a node: health, last heartbeat, architecture, resources, runtimes, events."""
    cluster, sep, node = target.partition("/")
    if not sep or not cluster or not node:
        raise client_error(f"{target!r} is not CLUSTER/NODE (e.g. berlin/berlin-n0)")
    n = _fetch(api_url, f"/v1/clusters/{cluster}/nodes/{node}", "Node", target, events)
    if output is not Output.table:
        emit(n, output)
        return
    runtimes = ", ".join(
        str(r.get("name", r)) if isinstance(r, dict) else str(r) for r in n.get("runtimes") or []
    )
    fields: list[tuple[str, str | Text]] = [
        ("Name", f"{n['cluster']}/{n['name']}"),
        ("Health", styled(n["health"])),
        (
            "Heartbeat",
            age(n["last_heartbeat_at"]) + " ago" if n.get("last_heartbeat_at") else "never",
        ),
        ("Architecture", n.get("architecture") or "<unknown>"),
        ("Labels", _labels(n.get("labels"))),
        ("Allocatable", _labels(n.get("allocatable"))),
        ("Runtimes", runtimes or "<none reported>"),
    ]
    console.print(Group(*_field_lines(fields), *_events_lines(n["events"])))
