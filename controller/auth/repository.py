"""All SQL of the auth domain: API tokens by name and by hash."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import ApiToken


def by_hash(session: Session, token_hash: str) -> ApiToken | None:
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))


def by_name(session: Session, name: str, *, lock: bool = False) -> ApiToken | None:
    stmt = select(ApiToken).where(ApiToken.name == name)
    return session.scalar(stmt.with_for_update() if lock else stmt)


def all_tokens(session: Session) -> Sequence[ApiToken]:
    return session.scalars(select(ApiToken).order_by(ApiToken.name)).all()
