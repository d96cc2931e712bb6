"""``edgefleet rollout status|schedule|pause|resume|abort|undo|retry``: watch and steer one
rollout."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import client_error, fail
from controller.cli.format import (
    PHASE_STYLE,
    age,
    counts,
    duration,
    nodes_done,
    percent,
    plain_table,
    styled,
    wave_label,
)
from controller.cli.get import LimitOpt, ListOutput, ListOutputOpt, collect_pages, show_listing
from controller.cli.options import ApiUrl, OutputOpt
from controller.cli.output import Output, console, emit, err_console

rollout_app = typer.Typer(
    help="Watch and steer rollouts: status, nodes, schedule, pause, resume, abort, undo, retry.",
    no_args_is_help=True,
)

# A rollout in one of these phases changes no more by itself (Failed is where the
# reconciler decides between rollback and pause; Paused waits for a human).
TERMINAL_PHASES = ("Succeeded", "RolledBack", "Aborted", "Failed")
WATCH_STOP_PHASES = (*TERMINAL_PHASES, "Paused")


def _progress(d: dict[str, Any]) -> tuple[int, int]:
    waves = d.get("wave_detail") or []
    done = sum(nodes_done(w.get("states") or {}) for w in waves)
    return done, sum(int(w["nodes"]) for w in waves)


def _status_line(d: dict[str, Any]) -> str:
    done, total = _progress(d)
    return (
        f"rollout {d['name']}: {d['phase']}, wave {wave_label(d)}, "
        f"{done}/{total} node(s) ({percent(done, total)}%)"
        + (f": {d['message']}" if d.get("message") else "")
    )


def _status_view(d: dict[str, Any]) -> Group:
    head = Text("rollout ")
    head.append(d["name"], style="bold")
    head.append(f" (generation {d['generation']}, {d['model']}:{d['version']}): ")
    head.append(d["phase"], style=PHASE_STYLE.get(d["phase"], ""))
    rows: list[list[Any]] = []
    for w in d.get("wave_detail") or []:
        nodes, done = int(w["nodes"]), nodes_done(w.get("states") or {})
        rows.append(
            [
                f"wave {w['index']}",
                styled(w["phase"]),
                ProgressBar(total=max(nodes, 1), completed=done if nodes else 1, width=30),
                f"{percent(done, nodes):>3}%",
                f"{done}/{nodes}",
                duration(w.get("bake_s")),
                counts(w.get("states")),
            ]
        )
    done, total = _progress(d)
    rows.append(
        [
            "total",
            styled(d["phase"]),
            ProgressBar(total=max(total, 1), completed=done if total else 1, width=30),
            f"{percent(done, total):>3}%",
            f"{done}/{total}",
            "",
            counts(d.get("states")),
        ]
    )
    table = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in ("WAVE", "PHASE", "PROGRESS", "", "NODES", "BAKE", "STATES"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(v if not isinstance(v, str) else Text(v) for v in row))
    parts: list[RenderableType] = [head, table]
    if d.get("message"):
        parts.append(Text(f"message: {d['message']}"))
    return Group(*parts)


@rollout_app.command("status")
def rollout_status(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="Refresh until the rollout ends or pauses; exit 0 if Succeeded."
        ),
    ] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --watch: give up after this many seconds.")
    ] = None,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Per-wave progress (Running + Healthy nodes of each wave) and the phase.

    With --watch, refreshes until the phase is Succeeded, RolledBack, Aborted, Failed or
    Paused; exits 0 only for Succeeded (1 otherwise, and on --timeout)."""
    client = ApiClient(api_url)
    path = f"/v1/rollouts/{name}"
    timed_out = False
    try:
        detail = client.get(path)
        if watch:
            deadline = None if timeout is None else time.monotonic() + timeout

            def step() -> bool:
                """Wait, refresh; False when the watch is over."""
                nonlocal detail, timed_out
                if detail["phase"] in WATCH_STOP_PHASES:
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    return False
                pause = interval if deadline is None else min(interval, deadline - time.monotonic())
                time.sleep(max(0.0, pause))
                detail = client.get(path)
                return True

            if output is not Output.table:
                while step():
                    pass
            elif console.is_terminal:
                with Live(_status_view(detail), console=console, refresh_per_second=4) as live:
                    while step():
                        live.update(_status_view(detail))
            else:  # a log: one line per change, then the final picture
                last = _status_line(detail)
                console.print(Text(last))
                while step():
                    line = _status_line(detail)
                    if line != last:
                        console.print(Text(line))
                        last = line
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    if output is Output.table:
        if not (watch and console.is_terminal):
            console.print(_status_view(detail))
    else:
        emit(detail, output)
    if timed_out:
        err_console.print(
            Text(f"timed out after {timeout:g} s: rollout {name} is still {detail['phase']}")
        )
        raise typer.Exit(code=1)
    if watch and detail["phase"] != "Succeeded":
        raise typer.Exit(code=1)


# ---------------------------------------------------------------- rollout schedule


def _window_text(w: dict[str, Any] | None) -> str:
    if not w:
        return "-"
    return f"{w['start']} .. {w['end'] or 'open-ended'}"


def _schedule_view(d: dict[str, Any]) -> Group:
    head = Text("rollout ")
    head.append(d["name"], style="bold")
    sched = d.get("schedule")
    if not sched:
        head.append(": no schedule (waves start nodes at any time)")
        return Group(head)
    parts = []
    if sched.get("startAt"):
        parts.append(f"start at {sched['startAt']}")
    for w in sched.get("windows") or []:
        parts.append(f"window '{w['cron']}' for {w['duration']}")
    parts.append(f"in {sched.get('timeZone') or 'each node' + chr(39) + 's zone'}")
    if sched.get("bakeInWindowsOnly"):
        parts.append("bake in windows only")
    head.append(": " + ", ".join(parts))
    table = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in ("WAVE", "PHASE", "TIME ZONE", "NODES", "NOT STARTED", "NOW", "WINDOW", "NEXT"):
        table.add_column(col)
    for wave in d.get("waves") or []:
        for z in wave["zones"]:
            if z.get("problem"):
                now, window, nxt = "never", z["problem"], "-"
            else:
                now = "open" if z["open"] else z["reason"]
                if z.get("frozenBy"):
                    now += f" ({', '.join(z['frozenBy'])})"
                window, nxt = _window_text(z.get("window")), _window_text(z.get("nextWindow"))
            table.add_row(
                f"wave {wave['index']}",
                styled(wave["phase"]),
                Text(z.get("timeZone") or "-"),
                str(z["nodes"]),
                str(z["notStarted"]),
                Text(now),
                Text(window),
                Text(nxt),
            )
    return Group(head, table)


@rollout_app.command("schedule")
def rollout_schedule(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    at: Annotated[
        str | None,
        typer.Option("--at", help="No wave starts before this RFC 3339 instant (with offset)."),
    ] = None,
    window: Annotated[
        list[str] | None,
        typer.Option(
            "--window", help="Maintenance window opening, a cron expression ('0 1 * * *'); repeat"
        ),
    ] = None,
    duration: Annotated[
        list[str] | None,
        typer.Option("--duration", help="How long each window stays open (4h): one, or one each"),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz", help="IANA zone of the windows (default: each node's edgefleet.io/timezone)"
        ),
    ] = None,
    bake_in_windows_only: Annotated[
        bool, typer.Option("--bake-in-windows-only", help="Count bake time only inside windows.")
    ] = False,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="Remove the schedule: nodes start at any time.")
    ] = False,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Show, set, replace or cancel a rollout's schedule.

    Without options, shows per wave and per time zone the window open now and the next
    one. With --at and/or --window/--duration, replaces the whole schedule (safe at any
    time: nodes already moved stay). --cancel removes it."""
    windows = list(window or [])
    durations = list(duration or [])
    changing = at is not None or bool(windows) or tz is not None or bake_in_windows_only
    if cancel and (changing or durations):
        raise client_error("--cancel takes no other schedule option")
    if len(durations) == 1 and len(windows) > 1:
        durations = durations * len(windows)
    if len(durations) != len(windows):
        raise client_error(
            f"{len(windows)} --window but {len(durations)} --duration: give one --duration "
            "for all, or one per --window"
        )
    client = ApiClient(api_url)
    try:
        if cancel:
            detail = client.post(f"/v1/rollouts/{name}/schedule", json={"schedule": None})
        elif changing:
            schedule: dict[str, Any] = {
                "windows": [
                    {"cron": c, "duration": d} for c, d in zip(windows, durations, strict=True)
                ],
                "bakeInWindowsOnly": bake_in_windows_only,
            }
            if at is not None:
                schedule["startAt"] = at
            if tz is not None:
                schedule["timeZone"] = tz
            detail = client.post(f"/v1/rollouts/{name}/schedule", json={"schedule": schedule})
        else:
            detail = client.get(f"/v1/rollouts/{name}/schedule")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    if output is Output.table:
        console.print(_schedule_view(detail))
    else:
        emit(detail, output)


# ---------------------------------------------------------------- a rollout's nodes


def _nodes_table(items: list[dict[str, Any]], wide: bool) -> Table:
    now = datetime.now(UTC)
    extra = ["P50-MS", "ERRORS", "SAMPLES"] if wide else []

    def metric(n: dict[str, Any], key: str) -> str:
        value = (n.get("metrics") or {}).get(key)
        return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    return plain_table(
        ["NODE", "WAVE", "STATE", "DESIRED", "OBSERVED", "P95-MS", *extra, "AGE", "MESSAGE"],
        [
            [
                f"{n['cluster']}/{n['node']}",
                "" if n.get("wave") is None else n["wave"],
                n["state"],
                n.get("desired") or "",
                n.get("observed") or "",
                metric(n, "p95_ms"),
                *([metric(n, "p50_ms"), metric(n, "errors"), metric(n, "samples")] if wide else []),
                age(n.get("updated_at"), now=now),
                n.get("message") or "",
            ]
            for n in items
        ],
    )


@rollout_app.command("nodes")
def rollout_nodes(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    state: Annotated[
        str | None,
        typer.Option(
            "--state", "-s", help="Only the nodes in this state (Failed, Deferred, Running...)."
        ),
    ] = None,
    wave: Annotated[
        int | None, typer.Option("--wave", "-w", min=0, help="Only this wave (its index).")
    ] = None,
    limit: LimitOpt = None,
    output: ListOutputOpt = ListOutput.table,
    api_url: ApiUrl = None,
) -> None:
    """A rollout's nodes, by wave, then cluster and node: state, versions, latest p95 and
    why (`--state Failed`: the ones that failed, each with its reason)."""
    path = f"/v1/rollouts/{name}/nodes"
    show_listing(
        lambda c: collect_pages(c, path, limit, state=state, wave=wave),
        output,
        api_url,
        _nodes_table,
    )


# ---------------------------------------------------------------- rollout commands

COMMANDS = {
    "pause": "Pause a rollout: the reconciler leaves it alone until resume.",
    "resume": "Resume a paused rollout.",
    "abort": "Abort an active rollout: touched nodes return to their previous version.",
    "undo": "Undo a Succeeded rollout: its nodes return to their previous version.",
    "retry": "Retry a Failed, RolledBack or Aborted rollout from its first wave.",
}


def _command(action: str) -> Callable[..., None]:
    def run(
        name: Annotated[str, typer.Argument(help="Rollout name.")],
        output: OutputOpt = Output.table,
        api_url: ApiUrl = None,
    ) -> None:
        client = ApiClient(api_url)
        try:
            detail = client.post(f"/v1/rollouts/{name}/{action}")
        except ApiError as exc:
            raise fail(exc) from exc
        finally:
            client.close()
        emit(detail, output, table=lambda d: f"rollout {d['name']} {d['phase']}")

    run.__name__ = f"rollout_{action}"
    return run


for _action, _help in COMMANDS.items():
    rollout_app.command(_action, help=_help)(_command(_action))
