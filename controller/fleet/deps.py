"""The request dependency of the cluster-agent routes (pull mode): the cluster credential
in ``Authorization: Bearer ...``, which must be the credential of the cluster the path
names. A coroutine, like the guard's, so the actor it sets reaches the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from controller.audit import set_actor
from controller.db.session import session_scope
from controller.fleet import pull

cluster_credential = HTTPBearer(
    auto_error=False,
    scheme_name="ClusterCredential",
    description="A pull cluster's own credential, from POST /v1/clusters/{name}/pull/enroll.",
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def _lookup(credential: str) -> str | None:
    with session_scope() as session:
        return pull.authenticate(session, credential)


async def current_cluster_agent(
    name: Annotated[str, Path(max_length=63)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(cluster_credential)],
) -> str:
    if credentials is None:
        raise _unauthorized("a cluster credential is required: Authorization: Bearer <credential>")
    cluster = await run_in_threadpool(_lookup, credentials.credentials)
    if cluster is None:
        raise _unauthorized("unknown or revoked cluster credential: enrol again")
    if cluster != name:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"the credential of cluster {cluster} cannot act for cluster {name}",
        )
    set_actor(f"cluster:{cluster}")
    return cluster


CLUSTER_AGENT = Security(current_cluster_agent)
ClusterAgentDep = Annotated[str, CLUSTER_AGENT]
