"""Reading an object's events (``audit.list_events``, and a rollout's:
``rollouts.repository.events``) reads its newest events by its index, never the newer
events of everything else. An object's events are together in time; with the filter as
equalities and ``ORDER BY id``, Postgres walked the primary key back from the newest
event (as though the object's events were spread evenly over the log) and read every
later one: millions for a rollout of months ago on a log of 10 million. Row counts from
Postgres's plans (tests/plans.py), never times."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from controller.audit import list_events
from controller.db.models import Rollout
from controller.rollouts import repository as rollout_repo
from tests.plans import captured
from tests.rollouts.helpers import stored_version

OLD, NEWER = 1000, 3000  # events

_EVENTS = text(
    """
    INSERT INTO events (created_at, object_kind, object_name, rollout_id, reason, message,
                        data)
    SELECT now() - make_interval(days => 90) + make_interval(secs => i), 'Rollout',
           (CAST(:names AS text[]))[1 + i % :n], (CAST(:ids AS bigint[]))[1 + i % :n],
           'Test', '', '{}'
    FROM generate_series(1, :count) AS i
    """
)


@pytest.fixture
def rollouts(session: Session) -> int:
    """The 1,000 events of rollout "long-ago", then 3,000 newer ones of two others,
    alternating, the statistics taken: the id of "long-ago". It is made last (the
    highest id), so that the log is not in rollout_id order (as a real log is not, with
    rollouts running side by side)."""
    version = stored_version(session, "audited", "1")
    ids: dict[str, int] = {}
    for name in ("recent-a", "recent-b", "long-ago"):
        r = Rollout(name=name, spec={}, model_version_id=version.id, phase="Succeeded")
        session.add(r)
        session.flush()
        ids[name] = r.id
    for names, count in ((["long-ago"], OLD), (["recent-a", "recent-b"], NEWER)):
        session.execute(
            _EVENTS,
            {"names": names, "ids": [ids[n] for n in names], "n": len(names), "count": count},
        )
    session.execute(text("ANALYZE events"))
    return ids["long-ago"]


def _newest(session: Session, name: str, n: int) -> list[int]:
    return list(
        session.scalars(
            text("SELECT id FROM events WHERE object_name = :name ORDER BY id DESC LIMIT :n"),
            {"name": name, "n": n},
        )
    )


def test_an_old_rollouts_newest_events_are_read_by_its_index(
    session: Session, rollouts: int
) -> None:
    with captured(session) as statements:
        got = rollout_repo.events(session, rollouts, limit=5)
    assert [e.id for e in got] == _newest(session, "long-ago", 5)
    (read,) = statements
    assert "ix_events_rollout_id" in read.indexes(), read.plan
    assert read.rows_read("events") <= 5, read.plan


def test_an_old_objects_events_are_read_by_its_index_both_ways(
    session: Session, rollouts: int
) -> None:
    with captured(session) as statements:
        newest = list_events(session, kind="Rollout", name="long-ago", limit=5)
        first = _newest(session, "long-ago", OLD)[-1]
        following = list_events(session, kind="Rollout", name="long-ago", limit=5, after=first)
    assert [e.id for e in newest] == _newest(session, "long-ago", 5)
    assert [e.id for e in following] == list(range(first + 1, first + 6))
    for st in (statements[0], statements[2]):
        assert "ix_events_object" in st.indexes(), st.plan
        assert st.rows_read("events") <= 5, st.plan
