from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from controller.agents import service
from controller.agents.deps import CredentialDep, unauthorized
from controller.agents.schemas import EnrollIn, EnrollOut, HeartbeatAck
from controller.errors import Unauthorized
from controller.web.deps import API_V1, SessionDep, SettingsDep
from controller.web.errors import error_body
from node_agent.contract import Heartbeat

router = APIRouter(prefix=f"{API_V1}/agents", tags=["agents"])


@router.post(
    "/enroll",
    response_model=EnrollOut,
    responses={
        401: {"description": "wrong join token"},
        404: {"description": "the node is not (yet) known to the controller"},
        409: {"description": "the node is already enrolled (an admin must reset it)"},
        503: {"description": "enrolment is disabled (no EDGEFLEET_AGENT_JOIN_TOKEN)"},
    },
)
def enroll(body: EnrollIn, session: SessionDep, settings: SettingsDep) -> EnrollOut | JSONResponse:
    """Exchange the join token for this node's own credential (shown only here). A node
    enrols once: enrolling an enrolled node again is refused until an admin resets it.
    Authenticated by the join token in the body, not by a bearer credential."""
    got = service.enroll(
        session,
        settings,
        cluster=body.cluster,
        node=body.node,
        join_token=body.join_token.get_secret_value(),
    )
    if isinstance(got, service.AlreadyEnrolled):
        return JSONResponse(error_body(got.code, got.detail), status_code=got.status_code)
    return EnrollOut(
        node=got.node.name,
        cluster=got.cluster,
        credential=got.credential,
        heartbeat_interval_s=settings.agent_heartbeat_interval_s,
        last_seq=got.node.last_seq,
    )


@router.post(
    "/heartbeat",
    response_model=HeartbeatAck,
    responses={
        401: {"description": "missing, unknown or rotated node credential"},
        403: {"description": "a heartbeat names a node other than the credential's"},
        413: {"description": "more heartbeats than EDGEFLEET_AGENT_MAX_BATCH"},
    },
)
async def heartbeat(
    credential: CredentialDep,
    request: Request,
    body: Annotated[Heartbeat | list[Heartbeat], Body()],
) -> HeartbeatAck:
    """One heartbeat, or a list of them (an agent replaying its offline queue, oldest
    first). Heartbeats at or below the node's last sequence number are counted as
    duplicates and not applied; the agent drops everything up to ``last_seq``.

    The hot path of the fleet (every node, every interval): a coroutine, so the request
    costs no thread hop; requests arriving together share one ingest transaction."""
    beats = body if isinstance(body, list) else [body]
    intake: service.HeartbeatIntake = request.app.state.heartbeats
    try:
        got = await intake.submit(credential, beats)
    except Unauthorized as exc:
        raise unauthorized(exc.message) from None
    return HeartbeatAck(
        accepted=got.accepted,
        duplicates=got.duplicates,
        last_seq=got.last_seq,
        benchmarks_pending=got.benchmarks_pending,
    )
