from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from controller.agents import service
from controller.agents.schemas import EnrollIn, EnrollOut, HeartbeatAck
from controller.api.deps import API_V1, SessionDep, SettingsDep
from controller.api.errors import error_body
from controller.db.models import Node
from controller.errors import Unauthorized
from node_agent.contract import Heartbeat

router = APIRouter(prefix=f"{API_V1}/agents", tags=["agents"])


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


class _NodeCredential(HTTPBearer):
    """The credential in ``Authorization: Bearer ...``; 401 (our error shape, with a
    hint) without one. HTTPBearer reads the header itself (no header parameter to
    validate) and puts the Bearer scheme into the OpenAPI document. Checked against the
    node rows in the ingest transaction itself."""

    async def __call__(self, request: Request) -> str:  # type: ignore[override]
        auth = await super().__call__(request)
        if auth is None:
            raise _unauthorized("a node credential is required: Authorization: Bearer <credential>")
        return auth.credentials


bearer_credential = _NodeCredential(
    auto_error=False,
    scheme_name="NodeCredential",
    description="The node's own credential, from POST /v1/agents/enroll.",
)


CredentialDep = Annotated[str, Depends(bearer_credential)]


@dataclass(frozen=True)
class AgentNode:
    node: Node
    cluster: str


def current_agent(session: SessionDep, credential: CredentialDep) -> AgentNode:
    """The node whose credential is in ``Authorization: Bearer ...``, locked (for the
    agents' other requests; heartbeats check the credential in their own transaction)."""
    found = service.authenticate(session, credential)
    if found is None:
        raise _unauthorized("unknown or revoked node credential: enrol again")
    return AgentNode(*found)


AgentDep = Annotated[AgentNode, Depends(current_agent)]


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
        raise _unauthorized(exc.message) from None
    return HeartbeatAck(
        accepted=got.accepted,
        duplicates=got.duplicates,
        last_seq=got.last_seq,
        benchmarks_pending=got.benchmarks_pending,
    )
