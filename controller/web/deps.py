from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from controller.db.session import session_scope
from controller.settings import Settings

API_V1 = "/v1"


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session() -> Iterator[Session]:
    """The request's unit of work: commit when the handler returns, roll back when it
    raises. ``scope="function"`` below makes the commit happen before the response is
    sent, so a client never sees a 2xx for a transaction that failed to commit."""
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
