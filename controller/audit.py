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

from sqlalchemy import literal, select, tuple_
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


_LAST_ID = 2**63 - 1


def list_events(
    session: Session, *, kind: str, name: str, limit: int = 100, after: int | None = None
) -> Sequence[Event]:
    """The object's last ``limit`` events, newest first; with ``after`` (a watcher's
    cursor), its first ``limit`` events past that id, oldest first, so that a watcher
    polling again from the last one it got misses none.

    The object is a range of ``ix_events_object``'s key past its kind, ``(name, id)``,
    so that only that index gives the order: with equalities on kind and name, Postgres
    may take the ORDER BY to be ``id`` alone and walk the primary key from the newest
    event, filtering: every later event read, for an object of months ago (as
    ``rollouts.repository.events``). The kind stays an equality: a range over the whole
    key ``(kind, name, id)`` ends the index scan only where the kind ends (31 ms, 2,900
    pages, for a node's 10 events among a million node events)."""
    key = tuple_(Event.object_name, Event.id)
    low = tuple_(literal(name), literal(0 if after is None else after))
    high = tuple_(literal(name), literal(_LAST_ID))
    stmt = select(Event).where(Event.object_kind == kind, key > low, key < high)
    columns = (Event.object_name, Event.id)
    order = [c.desc() for c in columns] if after is None else list(columns)
    stmt = stmt.order_by(*order)
    return session.scalars(stmt.limit(limit)).all()
