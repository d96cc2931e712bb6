"""The audit log: one Event row and one log line per transition, with its actor.

The actor is taken from a context variable that the API's authorization dependency sets
for the request (and CLI commands that write the database set for themselves), so a
service records who asked without every signature carrying it. Work the controller does
on its own (the reconciler, beat) has none: its events carry a null actor."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Event

log = logging.getLogger("edgefleet.events")
_actor: ContextVar[str | None] = ContextVar("edgefleet_actor", default=None)


def set_actor(actor: str | None) -> None:
    """Who the events recorded from now on in this context are on behalf of."""
    _actor.set(actor)


def current_actor() -> str | None:
    return _actor.get()


@contextmanager
def acting_as(actor: str | None) -> Iterator[None]:
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def record_event(
    session: Session,
    *,
    kind: str,
    name: str,
    reason: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    rollout_id: int | None = None,
    actor: str | None = None,
) -> Event:
    actor = actor if actor is not None else _actor.get()
    event = Event(
        object_kind=kind,
        object_name=name,
        reason=reason,
        message=message,
        data=data or {},
        rollout_id=rollout_id,
        actor=actor,
    )
    session.add(event)
    if actor is not None:
        log.info("%s %s %s: %s (by %s)", kind, name, reason, message, actor)
    else:
        log.info("%s %s %s: %s", kind, name, reason, message)
    return event


def list_events(
    session: Session, *, kind: str, name: str, limit: int = 100, after: int | None = None
) -> Sequence[Event]:
    """The object's last ``limit`` events, newest first; with ``after`` (a watcher's
    cursor), its first ``limit`` events past that id, oldest first, so that a watcher
    polling again from the last one it got misses none."""
    stmt = select(Event).where(Event.object_kind == kind, Event.object_name == name)
    if after is None:
        stmt = stmt.order_by(Event.id.desc())
    else:
        stmt = stmt.where(Event.id > after).order_by(Event.id)
    return session.scalars(stmt.limit(limit)).all()
