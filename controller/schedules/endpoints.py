from __future__ import annotations

from fastapi import APIRouter, Response, status

from controller.auth.guard import OPERATOR, VIEWER
from controller.schedules import service
from controller.schedules.schemas import FreezeOut
from controller.schedules.spec import FreezePeriod
from controller.web.deps import API_V1, SessionDep

router = APIRouter(prefix=f"{API_V1}/freezes", tags=["schedules"])


@router.get("", response_model=list[FreezeOut], dependencies=[VIEWER])
def list_freezes(session: SessionDep) -> list[FreezeOut]:
    return [FreezeOut.model_validate(f) for f in service.list_freezes(session)]


@router.get("/{name}", response_model=FreezeOut, dependencies=[VIEWER])
def get_freeze(name: str, session: SessionDep) -> FreezeOut:
    return FreezeOut.model_validate(service.require_freeze(session, name))


@router.post(
    "",
    response_model=FreezeOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[OPERATOR],
)
def create_freeze(body: FreezePeriod, session: SessionDep, response: Response) -> FreezeOut:
    """Create a freeze period, or replace the one of that name (200). No wave starts on
    the nodes it selects while it lasts; waves already running keep the nodes moved."""
    row, action = service.create_freeze(session, body)
    if action != "created":
        response.status_code = status.HTTP_200_OK
    return FreezeOut.model_validate(row)


@router.delete("/{name}", response_model=FreezeOut, dependencies=[OPERATOR])
def delete_freeze(name: str, session: SessionDep) -> FreezeOut:
    """Delete a freeze period (404 when there is none of that name); returns it as it
    was. Rollouts it held may start their nodes from their next step on."""
    return FreezeOut.model_validate(service.delete_freeze(session, name))
