"""All SQL of schedules: freeze periods, and the node labels calendars are read from."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.arrays import any_of
from controller.db.models import FreezePeriod, Node


def get_freeze(session: Session, name: str) -> FreezePeriod | None:
    return session.scalar(select(FreezePeriod).where(FreezePeriod.name == name))


def delete_freeze(session: Session, row: FreezePeriod) -> None:
    session.delete(row)
    session.flush()


def list_freezes(session: Session) -> Sequence[FreezePeriod]:
    return session.scalars(select(FreezePeriod).order_by(FreezePeriod.name)).all()


def node_labels(session: Session, node_ids: Collection[int]) -> dict[int, dict[str, Any]]:
    """The labels of these nodes (a node's site zone is one), by node id."""
    if not node_ids:
        return {}
    rows = session.execute(select(Node.id, Node.labels).where(any_of(Node.id, node_ids)))
    return {node_id: dict(labels or {}) for node_id, labels in rows}
