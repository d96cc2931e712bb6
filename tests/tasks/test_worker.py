"""A real Celery worker (``edgefleet worker``) on real Redis and Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from controller.api.app import create_app
from controller.db.models import Event
from controller.registry import samples
from controller.settings import Settings
from controller.tasks.celery_app import celery_app, configure
from tests import models as packaged
from tests.conftest import bearer
from tests.live import stop_process_group


@contextmanager
def worker(log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    full_env = {**os.environ, "EDGEFLEET_TASKS_EAGER": "false", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli.main", "worker", "--concurrency", "1"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill it with its children
        )
    try:
        wait_for(
            lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 60, "worker ready"
        )
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        stop_process_group(proc)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def queued(settings: Settings, committed: None, redis_available: None) -> Iterator[TestClient]:
    """An API whose tasks go through Redis to a real worker (not eager)."""
    configure(settings.model_copy(update={"tasks_eager": False}))
    try:
        with TestClient(create_app(settings), headers=bearer("admin")) as client:
            yield client
    finally:
        configure(settings)


def status_of(client: TestClient, name: str, version: str) -> str:
    result: str = client.get(f"/v1/models/{name}/versions/{version}").json()["status"]
    return result


def test_worker_validates_pushed_versions(queued: TestClient, tmp_path: Path) -> None:
    with worker(tmp_path / "worker.log"):
        resp = queued.post(
            "/v1/models/cam/versions",
            data={"version": "1"},
            files={"file": ("m.onnx", samples.build_cnn(), "application/octet-stream")},
        )
        assert resp.status_code == 201
        assert resp.json()["status"] == "Pending"
        wait_for(lambda: status_of(queued, "cam", "1") == "Ready", 60, "validation")
    body = queued.get("/v1/models/cam/versions/1").json()
    assert body["validation"]["passed"] is True
    assert body["benchmark"]["runs"] == 20


def test_worker_killed_mid_validation_is_recovered(
    queued: TestClient, engine: Engine, tmp_path: Path
) -> None:
    data = packaged.ppocr_detector().read_bytes()
    # A benchmark long enough to be certain the kill lands in the middle of it.
    with worker(tmp_path / "slow.log", EDGEFLEET_BENCHMARK_RUNS="1000000") as proc:
        resp = queued.post(
            "/v1/models/det/versions",
            data={"version": "4"},
            files={"file": ("det.onnx", data, "application/octet-stream")},
        )
        assert resp.status_code == 201
        wait_for(lambda: status_of(queued, "det", "4") == "Validating", 60, "Validating")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert status_of(queued, "det", "4") == "Validating"  # stuck: nobody is working on it

    # Stuck for longer than a millisecond: no need to wait for a longer threshold.
    with worker(tmp_path / "recover.log", EDGEFLEET_STUCK_VALIDATION_S="0.001"):
        celery_app.send_task("registry.requeue_stuck")  # what beat sends every minute
        wait_for(lambda: status_of(queued, "det", "4") == "Ready", 120, "recovery")
    with engine.connect() as conn:
        reasons = conn.scalars(
            select(Event.reason).where(Event.object_name == "det:4").order_by(Event.id)
        ).all()
    assert reasons == ["Pushed", "Validated"]  # exactly one verdict, no duplicates
