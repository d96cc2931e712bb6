from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import AwareDatetime

from controller.auth.guard import OPERATOR, VIEWER
from controller.db.models import AssignmentState
from controller.errors import InvalidInput
from controller.rollouts import commands, scheduling, service
from controller.rollouts import repository as repo
from controller.rollouts.schemas import (
    EventOut,
    RolloutNodeOut,
    RolloutOut,
    RolloutSummary,
    WaveOut,
    summary,
)
from controller.schedules.schemas import ScheduleChange
from controller.web.deleted import Deleted
from controller.web.deps import API_V1, SessionDep
from controller.web.pagination import Page, PageDep

router = APIRouter(prefix=f"{API_V1}/rollouts", tags=["rollouts"])


def _detail(session: SessionDep, name: str) -> RolloutOut:
    r = repo.require(session, name)
    model, version = repo.model_version_label(session, r.model_version_id)
    tally = repo.tally(session, r)
    waves = [
        WaveOut(
            index=w.index,
            phase=w.phase,
            nodes=w.node_count,
            bake_s=w.bake_s,
            states=tally.states.get(w.id, {}),
            started_at=w.started_at,
            baked_at=w.baked_at,
            finished_at=w.finished_at,
        )
        for w in r.waves
    ]
    base = summary(r, model, version, pending=tally.pending)
    return RolloutOut(
        **base.model_dump(),
        spec=r.spec,
        states=tally.totals,
        versions=tally.versions,
        wave_detail=waves,
        started_at=r.started_at,
        finished_at=r.finished_at,
        events=[EventOut.of(e) for e in repo.events(session, r.id, limit=10)],
    )


@router.get("", response_model=Page[RolloutSummary], dependencies=[VIEWER])
def list_rollouts(session: SessionDep, page: PageDep) -> Page[RolloutSummary]:
    rows, total = repo.list_rollouts(session, limit=page.limit, offset=page.offset)
    pending = repo.pending_counts(session, [r.id for r in rows])
    labels = repo.model_version_labels(session, [r.model_version_id for r in rows])
    items = [summary(r, *labels[r.model_version_id], pending=pending.get(r.id, 0)) for r in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/{name}", response_model=RolloutOut, dependencies=[VIEWER])
def get_rollout(name: str, session: SessionDep) -> RolloutOut:
    return _detail(session, name)


@router.delete("/{name}", response_model=Deleted, dependencies=[OPERATOR])
def delete_rollout(name: str, session: SessionDep) -> Deleted:
    """Delete a finished rollout (409 while it is active: abort it first). Its nodes keep
    the versions they run; its waves and events go with it."""
    service.delete(session, name)
    return Deleted(kind="Rollout", name=name)


@router.get("/{name}/events", response_model=list[EventOut], dependencies=[VIEWER])
def rollout_events(
    name: str, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[EventOut]:
    r = repo.require(session, name)
    return [EventOut.of(e) for e in repo.events(session, r.id, limit=limit)]


@router.get("/{name}/nodes", response_model=Page[RolloutNodeOut], dependencies=[VIEWER])
def rollout_nodes(
    name: str,
    session: SessionDep,
    page: PageDep,
    state: Annotated[
        AssignmentState | None, Query(description="Only the nodes in this state.")
    ] = None,
    wave: Annotated[int | None, Query(ge=0, le=10_000, description="Only this wave.")] = None,
) -> Page[RolloutNodeOut]:
    """The rollout's nodes, a page at a time, by wave, then cluster and node name: each
    node's state, versions, the reason for its state, and its agent's latest metrics."""
    r = repo.require(session, name)
    wave_id = None
    if wave is not None:
        wave_id = next((w.id for w in r.waves if w.index == wave), None)
        if wave_id is None:
            raise InvalidInput(
                f"rollout {name} has {len(r.waves)} wave(s): wave {wave} is not one of them",
                loc=("query", "wave"),
            )
    rows, total = repo.rollout_nodes(
        session, r, state=state, wave_id=wave_id, limit=page.limit, offset=page.offset
    )
    items = [
        RolloutNodeOut(
            cluster=row.cluster,
            node=row.node,
            wave=row.wave,
            state=row.assignment.state,
            desired=row.desired,
            observed=row.observed,
            message=row.assignment.message,
            metrics=row.assignment.metrics or {},
            updated_at=row.assignment.updated_at,
        )
        for row in rows
    ]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/{name}/schedule", dependencies=[VIEWER])
def get_schedule(
    name: str,
    session: SessionDep,
    at: Annotated[
        AwareDatetime | None,
        Query(description="evaluate at this RFC 3339 instant instead of now (a preview)"),
    ] = None,
) -> dict[str, Any]:
    """The rollout's schedule and, per wave and per time zone of its nodes, the window
    open now, the next one, and what holds the nodes (a freeze, the start time)."""
    return scheduling.schedule_view(session, name, at)


# Declared before /{name}/{action}, which would otherwise take "schedule" for an action.
@router.post("/{name}/schedule", dependencies=[OPERATOR])
def set_schedule(name: str, body: ScheduleChange, session: SessionDep) -> dict[str, Any]:
    """Set, replace or (``{"schedule": null}``) cancel the rollout's schedule, at any
    time. Nodes already moved stay; the next step admits by the new calendar."""
    scheduling.set_schedule(session, name, body.schedule)
    session.flush()
    return scheduling.schedule_view(session, name)


@router.post(
    "/{name}/{action}",
    response_model=RolloutOut,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[OPERATOR],
)
def rollout_command(
    name: str, action: Literal["pause", "resume", "abort", "undo", "retry"], session: SessionDep
) -> RolloutOut:
    commands.command(session, name, action)
    session.flush()
    return _detail(session, name)
