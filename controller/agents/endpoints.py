from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, HTTPException, status

from controller.agents import service
from controller.agents.schemas import EnrollIn, EnrollOut, HeartbeatAck
from controller.api.deps import API_V1, SessionDep, SettingsDep
from controller.db.models import Node
from node_agent.contract import Heartbeat

router = APIRouter(prefix=f"{API_V1}/agents", tags=["agents"])


@dataclass(frozen=True)
class AgentNode:
    node: Node
    cluster: str


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def current_agent(
    session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> AgentNode:
    """The node whose credential is in ``Authorization: Bearer ...``."""
    scheme, _, credential = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise _unauthorized("a node credential is required: Authorization: Bearer <credential>")
    found = service.authenticate(session, credential.strip())
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
        503: {"description": "enrolment is disabled (no EDGEFLEET_AGENT_JOIN_TOKEN)"},
    },
)
def enroll(body: EnrollIn, session: SessionDep, settings: SettingsDep) -> EnrollOut:
    """Exchange the join token for this node's own credential (shown only here).
    Enrolling again rotates it: the previous credential stops working."""
    got = service.enroll(
        session,
        settings,
        cluster=body.cluster,
        node=body.node,
        join_token=body.join_token.get_secret_value(),
    )
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
def heartbeat(
    agent: AgentDep,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[Heartbeat | list[Heartbeat], Body()],
) -> HeartbeatAck:
    """One heartbeat, or a list of them (an agent replaying its offline queue, oldest
    first). Heartbeats at or below the node's last sequence number are counted as
    duplicates and not applied; the agent drops everything up to ``last_seq``."""
    beats = body if isinstance(body, list) else [body]
    got = service.receive_heartbeats(session, settings, agent.node, agent.cluster, beats)
    return HeartbeatAck(accepted=got.accepted, duplicates=got.duplicates, last_seq=got.last_seq)
