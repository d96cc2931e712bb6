from __future__ import annotations

from fastapi import APIRouter, status

from controller.auth import repository as repo
from controller.auth import service
from controller.auth.guard import Admin, Viewer
from controller.auth.schemas import TokenCreated, TokenIn, TokenOut, WhoAmI
from controller.db.base import utcnow
from controller.web.deps import API_V1, SessionDep

router = APIRouter(prefix=API_V1, tags=["access"])


@router.get("/whoami", response_model=WhoAmI)
def whoami(principal: Viewer) -> WhoAmI:
    """The caller's identity and role, as the controller sees them."""
    return WhoAmI(actor=principal.actor, role=principal.role)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(session: SessionDep, _: Admin) -> list[TokenOut]:
    now = utcnow()
    return [TokenOut.of(t, now=now) for t in repo.all_tokens(session)]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenIn, session: SessionDep, principal: Admin) -> TokenCreated:
    """A new API token. Its value is in this answer only; store it now."""
    row, token = service.create_token(
        session, name=body.name, role=body.role, expires=body.expires, created_by=principal.actor
    )
    return TokenCreated(**TokenOut.of(row, now=utcnow()).model_dump(), token=token)


@router.delete("/tokens/{name}", response_model=TokenOut)
def revoke_token(name: str, session: SessionDep, _: Admin) -> TokenOut:
    """Revoke a token at once. The row stays (the audit log names it) until a new token
    takes its name."""
    return TokenOut.of(service.revoke_token(session, name), now=utcnow())
