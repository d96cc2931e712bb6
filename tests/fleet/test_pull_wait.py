"""The pull long poll's wait (controller/fleet/pull.py, controller/db/notify.py) on real
Postgres commits: the commit of a new revision wakes a waiting poll at once through
``NOTIFY``; an idle poll makes no query while it waits; with its listener's connection
cut, a poll falls back to checking once a second and still sees the change."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text

from controller.db import notify
from controller.db.models import PullCluster
from controller.db.session import get_engine, session_scope
from controller.fleet import pull
from controller.kube.driver import WorkloadSpec
from controller.kube.pull import PULL_CHANNEL, PullDriver
from controller.settings import Settings
from tests.fleet.test_pull import pull_doc
from tests.rollouts.helpers import apply

log = logging.getLogger(__name__)


def publish(version: str) -> None:
    spec = WorkloadSpec("detector", version, "ab" * 32, "onnx", "http://c/a", "r1", {})
    with session_scope() as s:
        PullDriver(s, "shop", silent_after_s=60).apply("detector", {"n1": spec})


@pytest.fixture
def shop(committed_client: TestClient, settings: Settings) -> int:
    """A pull cluster at revision 1, and this process's listener listening."""
    assert apply(committed_client, pull_doc()).status_code == 200
    publish("1.0.0")
    listener = notify.listener(settings.database_url, PULL_CHANNEL)
    assert listener is not None
    deadline = time.monotonic() + 10
    while not listener.listening:
        assert time.monotonic() < deadline, "the listener never connected"
        time.sleep(0.05)
    return 1


class Statements:
    """The statements this process sends to the database, counted."""

    def __init__(self, settings: Settings) -> None:
        self.engine = get_engine(settings)
        self.sent: list[str] = []

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._count)

    def _count(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.sent.append(statement)


async def revision_read(statements: Statements, timeout_s: float = 10) -> None:
    """Until a poll has read its cluster's revision: from then on, only a wake-up (or its
    timeout) ends its wait, so a commit after this cannot reach it by its first read."""
    deadline = time.monotonic() + timeout_s
    while not any(f"{PullCluster.__tablename__}.revision" in q for q in statements.sent):
        assert time.monotonic() < deadline, "the poll never read the revision"
        await asyncio.sleep(0.01)


def test_a_new_revision_wakes_a_waiting_poll_at_once(settings: Settings, shop: int) -> None:
    wait_s = 20.0
    listener = notify.listener(settings.database_url, PULL_CHANNEL)
    assert listener is not None

    async def scenario() -> tuple[Any, float]:
        with Statements(settings) as statements:
            poll = asyncio.create_task(
                pull.wait_for_desired(settings, "shop", since=1, wait_s=wait_s)
            )
            await revision_read(statements)
        assert not poll.done()  # nothing new yet: it waits
        await asyncio.to_thread(publish, "2.0.0")
        committed = time.monotonic()
        got = await poll
        return got, time.monotonic() - committed

    notified = listener.received
    got, latency = asyncio.run(scenario())
    assert (got.changed, got.revision) == (True, 2)
    assert got.node_labels == {"n1": {"model.edgefleet.io/detector": "2.0.0"}}
    log.warning("pull poll woken %.1f ms after the commit (timeout %.0f s)", latency * 1e3, wait_s)
    assert listener.received > notified  # the commit's NOTIFY reached this process
    assert latency < wait_s / 4, latency  # woken by the commit, not by its timeout


def _idle_poll(settings: Settings, wait_s: float) -> Any:
    return asyncio.run(pull.wait_for_desired(settings, "shop", since=1, wait_s=wait_s))


def test_an_idle_poll_makes_no_query_while_it_waits(
    settings: Settings, shop: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Statements(settings) as at_once:
        assert _idle_poll(settings, 0).changed is False
    with Statements(settings) as idle:
        started = time.monotonic()
        assert _idle_poll(settings, 2.5).changed is False
        assert time.monotonic() - started >= 2.5
    # The revision read and the answer's, however long it waited.
    assert len(idle.sent) == len(at_once.sent), (idle.sent, at_once.sent)

    # Without a listener (SQLite, or none connected) it checks once a second instead.
    monkeypatch.setattr(notify, "listener", lambda *_a: None)
    with Statements(settings) as checking:
        assert _idle_poll(settings, 2.5).changed is False
    extra = len(checking.sent) - len(at_once.sent)
    log.warning(
        "an idle 2.5 s pull poll: %d statements with the listener, %d checking every %.0f s",
        len(idle.sent),
        len(checking.sent),
        pull.POLL_CHECK_S,
    )
    # The checks at about 1 s, 2 s and 2.5 s (a slow read under load may skip the last).
    assert 2 <= extra <= 3, checking.sent


def test_a_cut_listener_falls_back_to_checking(
    settings: Settings, shop: int, committed_client: TestClient
) -> None:
    listener = notify.listener(settings.database_url, PULL_CHANNEL)
    assert listener is not None

    async def scenario() -> tuple[Any, float]:
        with Statements(settings) as statements:
            poll = asyncio.create_task(pull.wait_for_desired(settings, "shop", since=1, wait_s=20))
            await revision_read(statements)  # waiting on the listener now
        # Cut the listener's connection (as a database restart or a proxy would).
        with get_engine(settings).begin() as conn:
            cut = [
                pid
                for pid, _ in conn.execute(
                    text(
                        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query = :q AND datname = current_database()"
                    ),
                    {"q": f'LISTEN "{PULL_CHANNEL}"'},
                )
            ]
        assert cut, "no listening connection found"
        # Until its backend is gone (terminating is asynchronous).
        deadline = time.monotonic() + 10
        while True:
            with get_engine(settings).connect() as conn:
                alive = conn.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                    {"pids": list(cut)},
                )
            if not alive:
                break
            assert time.monotonic() < deadline, "the listener's backend did not end"
            await asyncio.sleep(0.01)
        # Committed while nobody listens: no NOTIFY reaches this process.
        await asyncio.to_thread(publish, "2.0.0")
        committed = time.monotonic()
        got = await poll
        return got, time.monotonic() - committed

    got, latency = asyncio.run(scenario())
    assert (got.changed, got.revision) == (True, 2)
    assert latency < 5, latency  # a check within POLL_CHECK_S, or the listener back
    # The listener reconnects by itself.
    deadline = time.monotonic() + 10
    while not listener.listening:
        assert time.monotonic() < deadline, "the listener did not reconnect"
        time.sleep(0.05)
