"""A rollout's schedule (spec.schedule): the plan's forecast per wave and time zone and
the nodes whose windows cannot be read, set or cancel it at any time, and the view of
its windows now (``GET /v1/rollouts/{name}/schedule``). The reconcile step's side is in
``step_schedule.py``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from controller.audit import record_event
from controller.db.base import utcnow
from controller.db.models import (
    AssignmentState,
    Rollout,
)
from controller.errors import Conflict, NotFound
from controller.kit.diff import diff
from controller.rollouts import planner
from controller.rollouts import repository as repo
from controller.rollouts.reconciler import queue_step
from controller.rollouts.spec import RolloutSpec
from controller.rollouts.state import TERMINAL_PHASES
from controller.rollouts.step_schedule import WAITING
from controller.schedules import service as schedules
from controller.schedules import windows
from controller.schedules.service import Calendars
from controller.schedules.spec import Schedule
from controller.schedules.windows import TIMEZONE_LABEL, Calendar

A = AssignmentState


def calendars_for(
    session: Session, spec: RolloutSpec, nodes: Sequence[planner.NodeView]
) -> Calendars | None:
    if spec.schedule is None:
        return None
    return Calendars(spec.schedule, schedules.freezes(session), {n.id: n.labels for n in nodes})


def schedule_problems(
    calendars: Calendars, nodes: Sequence[planner.NodeView]
) -> list[planner.Problem]:
    """Nodes whose windows cannot be read: no zone in the schedule nor on the node."""
    lost: dict[str, list[str]] = {}
    for n in nodes:
        group = calendars.group(calendars.key_of(n.id))
        if group.problem is not None:
            lost.setdefault(group.problem, []).append(n.key)
    return [
        planner.Problem(
            "NoTimeZone",
            f"{len(keys)} node(s): {problem}; give spec.schedule.timeZone or label the nodes "
            f"{TIMEZONE_LABEL}=<Area>.<City> (America.New_York)",
            keys,
        )
        for problem, keys in lost.items()
    ]


def add_forecast(
    plan: dict[str, Any],
    calendars: Calendars,
    waves: Sequence[planner.PlannedWave],
    now: datetime,
) -> None:
    """When each wave is expected to run (windows.forecast): when its first nodes may
    start, per time zone, and when it is expected baked. No time for the nodes
    themselves is modelled: a wave is taken to finish as soon as its last zone opens."""
    groups = [list(calendars.by_group(n.id for n in w.nodes)) for w in waves]
    # Nodes without a zone have no calendar (a NoTimeZone problem): never expected.
    usable: list[list[tuple[str, Calendar]]] = [
        [
            (calendars.group(k).label, cal)
            for k in keys
            if (cal := calendars.group(k).calendar) is not None
        ]
        for keys in groups
    ]
    timeline = windows.forecast(
        [[cal for _, cal in pairs] for pairs in usable],
        [timedelta(seconds=w.bake_s) for w in waves],
        now,
        bake_in_windows_only=calendars.schedule.bakeInWindowsOnly,
    )
    for out, pairs, keys, got in zip(plan["waves"], usable, groups, timeline, strict=True):
        zones: dict[str, str | None] = {calendars.group(k).label: None for k in keys}
        for (label, _), start in zip(pairs, got.starts, strict=True):
            zones[label] = _iso(start)
        known = [t for t in got.starts if t is not None]
        out["expected"] = {
            "start": _iso(min(known)) if known and len(pairs) == len(keys) else None,
            "finished": _iso(got.finished),
            "baked": _iso(got.baked),
            "zones": zones,
        }
    plan["schedule"] = {"evaluatedAt": now.isoformat()}


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def set_schedule(session: Session, name: str, schedule: Schedule | None) -> Rollout:
    """Set, replace or (None) cancel the rollout's schedule, at any time: under the
    rollout's row lock, so a step never reads half of it. Nodes already moved stay; the
    next step admits by the new calendar and queues its own follow-up."""
    rollout = repo.lock(session, name)
    if rollout is None:
        raise NotFound(f"rollout {name!r} not found")
    if rollout.phase in TERMINAL_PHASES:
        raise Conflict(f"rollout {name} is {rollout.phase}: there is nothing left to schedule")
    old = rollout.spec.get("schedule")
    new = None if schedule is None else schedule.model_dump(mode="json", exclude_none=True)
    if old == new:
        return rollout
    spec = {k: v for k, v in rollout.spec.items() if k != "schedule"}
    if new is not None:
        spec["schedule"] = new
    rollout.spec = spec
    if rollout.message is not None and rollout.message.startswith(WAITING):
        rollout.message = "schedule changed; waiting for the reconciler"
    # A follow-up queued for the old schedule's window must not hold back a new chain,
    # and nothing of the old calendar is left to catch up on.
    rollout.next_step_at = None
    rollout.schedule_evaluated_at = None
    record_event(
        session,
        kind="Rollout",
        name=name,
        rollout_id=rollout.id,
        reason="ScheduleCancelled" if new is None else "ScheduleChanged",
        message="schedule cancelled: nodes start at once"
        if new is None
        else "schedule set: nodes start only as it allows",
        data={"changes": diff({"schedule": old}, {"schedule": new})},
    )
    queue_step(session, rollout.id)
    return rollout


def schedule_view(session: Session, name: str, now: datetime | None = None) -> dict[str, Any]:
    """``GET /v1/rollouts/{name}/schedule``: per wave and per time zone of its nodes, the
    window open now (if any), the next one, and what holds the nodes (a freeze, the
    start time)."""
    rollout = repo.require(session, name)
    at = now or utcnow()
    spec = RolloutSpec.model_validate(rollout.spec)
    out: dict[str, Any] = {
        "name": name,
        "phase": rollout.phase,
        "schedule": rollout.spec.get("schedule"),
        "at": at,
        "evaluatedAt": rollout.schedule_evaluated_at,
        "waves": [],
    }
    if spec.schedule is None:
        return out
    rows = repo.rows_of(session, rollout.id)
    calendars = Calendars.load(session, spec.schedule, [r.node.id for r in rows])
    for wave in rollout.waves:
        ids = [r.node.id for r in rows if r.assignment.wave_id == wave.id]
        pending = {r.node.id for r in rows if r.assignment.state == A.PENDING}
        zones = []
        for key, members in calendars.by_group(ids).items():
            group = calendars.group(key)
            verdict = calendars.verdict(key, at)
            entry: dict[str, Any] = {
                "timeZone": group.zone,
                "nodes": len(members),
                "notStarted": sum(1 for m in members if m in pending),
                "freezes": list(group.freezes),
            }
            if verdict is None:
                entry["problem"] = group.problem
            else:
                entry.update(
                    open=verdict.allowed,
                    reason=verdict.reason,
                    window=_interval(verdict.window),
                    nextWindow=_interval(verdict.next_window),
                    frozenBy=list(verdict.frozen_by),
                )
            zones.append(entry)
        out["waves"].append({"index": wave.index, "phase": wave.phase, "zones": zones})
    return out


def _interval(interval: windows.Interval | None) -> dict[str, str | None] | None:
    if interval is None:
        return None
    return {"start": interval.start.isoformat(), "end": _iso(interval.end)}
