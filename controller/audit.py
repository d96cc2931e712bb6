"""The audit log: one Event row and one log line per transition."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Event

log = logging.getLogger("edgefleet.events")


def record_event(
    session: Session,
    *,
    kind: str,
    name: str,
    reason: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    rollout_id: int | None = None,
) -> Event:
    event = Event(
        object_kind=kind,
        object_name=name,
        reason=reason,
        message=message,
        data=data or {},
        rollout_id=rollout_id,
    )
    session.add(event)
    log.info("%s %s %s: %s", kind, name, reason, message)
    return event


def list_events(session: Session, *, kind: str, name: str, limit: int = 100) -> Sequence[Event]:
    stmt = (
        select(Event)
        .where(Event.object_kind == kind, Event.object_name == name)
        .order_by(Event.id.desc())
        .limit(limit)
    )
    return session.scalars(stmt).all()
