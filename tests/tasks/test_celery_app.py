"""The worker's liveness file and the guard for Redis channels of a dropped connection
(controller/tasks/celery_app.py); the real worker under a real Redis restart is in
test_restarts.py."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kombu.connection
import pytest
from kombu.transport import redis as kombu_redis

from controller.tasks import celery_app as module
from tests.conftest import REDIS_URL
from tests.tasks.test_worker import wait_for


@pytest.fixture
def fast_liveness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The watcher looks every 50 ms (the staleness is the fake clock's)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(module, "LIVENESS_INTERVAL_S", 0.05)
    return tmp_path / module.LIVENESS_FILE_NAME


def touched_since(file: Path, since: float) -> bool:
    return file.exists() and file.stat().st_mtime > since


def test_liveness_file_follows_the_event_loop(fast_liveness: Path) -> None:
    timer: list[Any] = []
    consumer = SimpleNamespace(connection=object())  # connected
    worker = SimpleNamespace(
        consumer=consumer,
        timer=SimpleNamespace(call_repeatedly=lambda secs, fun: timer.append(fun)),
    )
    clock = [1024.0]  # the loop's monotonic seconds, moved by the test (exact binary sums)
    step = module.LivenessFile(worker, clock=lambda: clock[0])
    step.start(worker)
    try:
        assert fast_liveness.exists()
        (turned,) = timer  # what the event loop's timer calls
        old = time.time() - 100

        # The loop turns: the watcher thread keeps the file fresh.
        os.utime(fast_liveness, (old, old))
        clock[0] += 10.0
        turned()
        wait_for(lambda: touched_since(fast_liveness, old), 5, "a touch while the loop turns")
        # Still fresh just short of the staleness since the last turn.
        clock[0] += module.LIVENESS_LOOP_STALE_S - 0.5
        assert step.check(worker)

        # The loop is stuck while connected: at the staleness, no more touches (neither
        # the thread's, which reads the same clock, nor this one).
        clock[0] += 0.5
        os.utime(fast_liveness, (old, old))
        assert not step.check(worker)
        assert not touched_since(fast_liveness, old)

        # Reconnecting to the broker blocks the loop by design: still alive.
        consumer.connection = None
        wait_for(lambda: touched_since(fast_liveness, old), 5, "a touch while reconnecting")
        assert step.check(worker)
    finally:
        step.stop(worker)
    assert not fast_liveness.exists()


def test_channel_of_a_collected_connection_fails_as_a_connection_error(
    redis_available: None,
) -> None:
    """What the worker does when Redis goes away: collect() detaches the transport,
    then the channel is closed and hands its unacknowledged messages back, which needs a
    new pool. Without the guard that is an AttributeError ('NoneType' object has no
    attribute 'hostname', or 'client'), which kills the worker; with it, a connection error, which
    Celery ignores while it reconnects."""
    connection_class: Any = kombu.connection.Connection  # kombu is untyped
    conn = connection_class(REDIS_URL)
    try:
        channel: Any = conn.channel()
        conn.collect()
        channel._pool = None  # as Channel.close() leaves it
        with pytest.raises(kombu_redis.Transport.connection_errors):
            channel._connparams()
    finally:
        conn.release()
