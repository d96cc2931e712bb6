"""``GET /v1/events``: the audit log of one cluster, node, model version or rollout.

Every transition and decision is an Event (controller/audit.py); rollouts have their own
route too (``/v1/rollouts/{name}/events``), and this one serves every kind the log holds
for a viewer. API tokens' events are left out: the token list is an admin's."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from controller.audit import list_events
from controller.auth.guard import VIEWER
from controller.rollouts.schemas import EventOut
from controller.web.deps import API_V1, SessionDep

router = APIRouter(prefix=f"{API_V1}/events", tags=["events"])

EventKind = Literal["Cluster", "Node", "ModelVersion", "Rollout"]


@router.get("", response_model=list[EventOut], dependencies=[VIEWER])
def events(
    session: SessionDep,
    kind: Annotated[EventKind, Query(description="The object's kind.")],
    name: Annotated[
        str,
        Query(
            min_length=1,
            max_length=253,
            description="Its name: a cluster, CLUSTER/NODE, MODEL:VERSION or a rollout.",
        ),
    ],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            description="Only events with a larger id, oldest first: the cursor of a watch "
            "(`edgefleet events --watch`), which asks again from the last id it got.",
        ),
    ] = None,
) -> list[EventOut]:
    """The object's events, newest first (with ``after``: the ones past it, oldest first)."""
    found = list_events(session, kind=kind, name=name, limit=limit, after=after)
    return [EventOut.of(e) for e in found]
