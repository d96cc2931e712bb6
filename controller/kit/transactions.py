"""Work that runs once a session's transaction commits, and never if it rolls back:
sending a Celery task for state that is durably stored, or a fault point that fires
right after a commit. Bound to SQLAlchemy's session events only, so the lowest layers
(``controller.faults``) may register work without importing the database layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import event
from sqlalchemy.orm import Session

_AFTER_COMMIT = "edgefleet.after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the session's current transaction commits (never if it rolls
    back). Used to send Celery tasks only for state that is durably stored."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@contextmanager
def suspend_after_commit(session: Session) -> Iterator[None]:
    """Drop the after-commit work registered inside this block (a dry-run's tasks)."""
    saved = list(session.info.get(_AFTER_COMMIT, []))
    try:
        yield
    finally:
        session.info[_AFTER_COMMIT] = saved


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    callbacks: list[Callable[[], None]] = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
