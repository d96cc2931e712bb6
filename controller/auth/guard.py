"""Who may call each route: FastAPI security dependencies, one per kind of caller.

Every route declares one of them, so the OpenAPI document lists each operation's
security requirement (the role as its scope) and a test walks all routes for it:
- ``VIEWER`` / ``OPERATOR`` / ``ADMIN``: an API token (``Authorization: Bearer eft_...``)
  whose role is at least that;
- ``ARTIFACT_READER``: an API token, a node credential, or an inference pod's artifact
  token (model downloads);
- ``DASHBOARD``: an API token in the header or the sign-in cookie, unless
  ``EDGEFLEET_DASHBOARD_PUBLIC``; ``METRICS``: a viewer token unless
  ``EDGEFLEET_METRICS_PUBLIC``.
Agent routes use the node credential (controller/agents/endpoints.py).

The dependencies are coroutines on purpose: the actor they set for the audit log is a
context variable, and only one set in the request's own task reaches the handler (a
dependency run in the thread pool sets it in a copy that is thrown away)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from starlette.concurrency import run_in_threadpool

from controller.agents import repository as agents_repo
from controller.agents.service import hash_credential
from controller.audit import set_actor
from controller.auth import service
from controller.auth.service import ANONYMOUS, Principal
from controller.crypto import ARTIFACT_TOKEN_PREFIX, verify_artifact_token
from controller.db.models import Role
from controller.db.session import session_scope
from controller.errors import Forbidden, Unauthorized
from controller.settings import Settings

SESSION_COOKIE = "edgefleet_session"

api_token = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token (`edgefleet tokens create`); the scopes name the least role.",
)
artifact_credential = HTTPBearer(
    auto_error=False,
    scheme_name="ArtifactAccess",
    description="An API token, a node credential, or an inference pod's artifact token.",
)
session_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    scheme_name="DashboardSession",
    description="Set by signing in at /login with an API token (it holds no token).",
)


def token_principal(token: str) -> Principal | None:
    with session_scope() as session:
        return service.authenticate(session, token)


def _missing(what: str) -> Unauthorized:
    return Unauthorized(f"{what} is required: Authorization: Bearer <token>")


def _check_role(principal: Principal, needed: Role) -> Principal:
    if principal.role is None or not principal.role.allows(needed):
        held = principal.role.value if principal.role else "none"
        raise Forbidden(f"{principal.actor} has role {held}; this needs {needed.value} or above")
    set_actor(principal.actor)
    return principal


async def authorize(
    scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_token)],
) -> Principal:
    needed = Role(scopes.scopes[-1]) if scopes.scopes else Role.ADMIN
    if credentials is None:
        raise _missing("an API token")
    principal = await run_in_threadpool(token_principal, credentials.credentials)
    if principal is None:
        raise Unauthorized("unknown, expired or revoked API token")
    return _check_role(principal, needed)


VIEWER = Security(authorize, scopes=[Role.VIEWER.value])
OPERATOR = Security(authorize, scopes=[Role.OPERATOR.value])
ADMIN = Security(authorize, scopes=[Role.ADMIN.value])
Viewer = Annotated[Principal, VIEWER]
Operator = Annotated[Principal, OPERATOR]
Admin = Annotated[Principal, ADMIN]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _artifact_principal(token: str, settings: Settings) -> Principal | None:
    if token.startswith(ARTIFACT_TOKEN_PREFIX + "."):
        cluster = verify_artifact_token(
            settings.secret_key.get_secret_value(), token, now=time.time()
        )
        return Principal(f"artifact:{cluster}", cluster=cluster) if cluster is not None else None
    if token.startswith(service.TOKEN_PREFIX):
        return token_principal(token)
    with session_scope() as session:
        found = agents_repo.node_name_by_credential_hash(session, hash_credential(token))
    if found is None:
        return None
    node, cluster = found
    return Principal(f"node:{cluster}/{node}", cluster=cluster, node=node)


async def authorize_artifact(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(artifact_credential)],
) -> Principal:
    if credentials is None or len(credentials.credentials) > 512:
        raise _missing("an API token, node credential or artifact token")
    principal = await run_in_threadpool(
        _artifact_principal, credentials.credentials, _settings(request)
    )
    if principal is None:
        raise Unauthorized("unknown, expired or revoked credential")
    set_actor(principal.actor)
    return principal


ARTIFACT_READER = Security(authorize_artifact)


async def authorize_dashboard(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_token)],
    cookie: Annotated[str | None, Depends(session_cookie)],
) -> Principal:
    settings = _settings(request)
    if settings.dashboard_public:
        return ANONYMOUS
    principal: Principal | None = None
    if credentials is not None:
        principal = await run_in_threadpool(token_principal, credentials.credentials)
    elif cookie and len(cookie) <= 256:
        principal = await run_in_threadpool(
            _session_principal, cookie, settings.secret_key.get_secret_value()
        )
    if principal is None:
        raise SignInRequired()
    return _check_role(principal, Role.VIEWER)


def _session_principal(value: str, secret: str) -> Principal | None:
    with session_scope() as session:
        return service.session_principal(session, value, secret, now=time.time())


def open_session(token: str, secret: str) -> str | None:
    """A dashboard session cookie's value for a valid token (None: not valid)."""
    with session_scope() as session:
        return service.open_session(session, token, secret, now=time.time())


async def authorize_metrics(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_token)],
) -> Principal:
    if _settings(request).metrics_public:
        return ANONYMOUS
    if credentials is None:
        raise _missing("a viewer token (or EDGEFLEET_METRICS_PUBLIC=true)")
    principal = await run_in_threadpool(token_principal, credentials.credentials)
    if principal is None:
        raise Unauthorized("unknown, expired or revoked API token")
    return _check_role(principal, Role.VIEWER)


DASHBOARD = Security(authorize_dashboard)
METRICS = Security(authorize_metrics)


class SignInRequired(Unauthorized):
    """A browser without a session: sent to the sign-in page (303), not shown JSON."""

    status_code = 303
    code = "sign_in_required"

    def __init__(self) -> None:
        super().__init__("sign in at /login")
        self.headers = {"Location": "/login"}
