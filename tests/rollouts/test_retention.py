"""Retention of the audit log: beat's purge deletes events older than
event_retention_days in bounded batches, oldest first, keeps an active rollout's, and
reads them by the created_at index."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from controller.db.base import utcnow
from controller.db.models import Event, Model, ModelVersion, Rollout, RolloutPhase
from controller.rollouts import repository as repo
from controller.rollouts import service
from controller.settings import Settings
from tests.rollouts.helpers import stored_version


@pytest.fixture
def retention(settings: Settings) -> Iterator[Settings]:
    """90 days, batches of 2 rows (the settings object is shared: restored after)."""
    saved = settings.event_retention_days, settings.retention_batch_rows
    settings.event_retention_days, settings.retention_batch_rows = 90, 2
    try:
        yield settings
    finally:
        settings.event_retention_days, settings.retention_batch_rows = saved


def _rollout(session: Session, name: str, phase: str) -> int:
    version_id = (
        session.scalar(select(ModelVersion.id).join(Model).where(Model.name == "retained"))
        or stored_version(session, "retained", "1").id
    )
    rollout = Rollout(name=name, spec={}, model_version_id=version_id, phase=phase)
    session.add(rollout)
    session.flush()
    return rollout.id


def _events(session: Session, age_days: float, n: int, rollout_id: int | None = None) -> None:
    at = utcnow() - timedelta(days=age_days)
    session.add_all(
        Event(
            object_kind="Rollout" if rollout_id else "Node",
            object_name=f"aged-{age_days}-{i}",
            reason="Test",
            rollout_id=rollout_id,
            created_at=at + timedelta(seconds=i),
        )
        for i in range(n)
    )
    session.flush()


def _names(session: Session) -> list[str]:
    return sorted(session.scalars(select(Event.object_name).where(Event.reason == "Test")))


def test_old_events_are_purged_in_batches_and_an_active_rollouts_stay(
    session: Session, retention: Settings
) -> None:
    active = _rollout(session, "still-running", RolloutPhase.PROGRESSING)
    done = _rollout(session, "long-done", RolloutPhase.SUCCEEDED)
    _events(session, 200, 5)
    _events(session, 100, 2, done)
    _events(session, 100, 3, active)
    _events(session, 89, 4)
    session.commit()  # to the test's savepoint: the purge's own sessions see the rows

    # One batch: the oldest two, and no more.
    assert repo.delete_events_before(session, utcnow() - timedelta(days=90), limit=2) == 2
    assert "aged-200-0" not in _names(session)
    assert "aged-200-2" in _names(session)
    session.commit()

    # Five more in batches of two (the last one short); the rest stays.
    assert service.purge_events(retention) == 5
    assert _names(session) == sorted(
        [f"aged-100-{i}" for i in range(3)] + [f"aged-89-{i}" for i in range(4)]
    )
    assert service.purge_events(retention) == 0

    # Once the rollout ends, its old events go too.
    session.execute(text("UPDATE rollouts SET phase = 'Succeeded' WHERE id = :id"), {"id": active})
    session.commit()
    assert service.purge_events(retention) == 3
    assert _names(session) == [f"aged-89-{i}" for i in range(4)]


def test_no_retention_keeps_every_event(session: Session, retention: Settings) -> None:
    retention.event_retention_days = 0
    _events(session, 10_000, 3)
    session.commit()
    assert service.purge_events(retention) == 0
    assert session.scalar(select(func.count()).where(Event.reason == "Test")) == 3


def test_the_purge_reads_events_by_the_created_at_index(session: Session) -> None:
    """On a table of millions of events a scan per batch would read them all; with too
    few rows to tell, the planner is told to avoid scans, and must still find an index."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    cutoff = utcnow() - timedelta(days=90)
    stmt = select(Event.id).where(Event.created_at < cutoff).order_by(Event.created_at).limit(5000)
    compiled = stmt.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
    plan = "\n".join(session.scalars(text(f"EXPLAIN {compiled}")))
    assert "ix_events_created_at" in plan, plan
