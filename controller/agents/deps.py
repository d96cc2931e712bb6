"""The request dependencies of the node-facing routes: the node credential in
``Authorization: Bearer ...`` and the node it names. Other domains' node-facing routes
(benchmark jobs) declare them too, so they live apart from the agents' endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBearer

from controller.agents import service
from controller.db.models import Node
from controller.web.deps import SessionDep


def unauthorized(detail: str) -> HTTPException:
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
            raise unauthorized("a node credential is required: Authorization: Bearer <credential>")
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
        raise unauthorized("unknown or revoked node credential: enrol again")
    return AgentNode(*found)


AgentDep = Annotated[AgentNode, Depends(current_agent)]
