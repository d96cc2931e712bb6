"""The rollout engine on a real Celery worker, real Redis and real Postgres: follow-up
steps are queued by the worker itself, and a worker killed inside a step loses nothing."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from controller.db.models import Event, Rollout
from controller.settings import Settings
from controller.tasks.celery_app import celery_app
from tests.rollouts.helpers import apply, cluster_doc, report, rollout_doc, running_versions
from tests.tasks.test_worker import queued, wait_for, worker

__all__ = ["queued"]  # the fixture, re-exported for pytest

FAST = {"EDGEFLEET_RECONCILE_INTERVAL_S": "0.2"}


@pytest.fixture
def agents(queued: TestClient) -> Iterator[None]:
    """Stand-ins for the node agents: report healthy numbers every 0.2 s."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            report()
            stop.wait(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


def phase(client: TestClient, name: str) -> str:
    result: str = client.get(f"/v1/rollouts/{name}").json()["phase"]
    return result


def reasons(engine: Engine, name: str) -> list[tuple[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Event.reason, Event.data)
            .join(Rollout, Rollout.id == Event.rollout_id)
            .where(Rollout.name == name)
            .order_by(Event.id)
        ).all()
    return [(r[0], (r[1] or {}).get("wave")) for r in rows]


def test_worker_drives_a_rollout_to_success(
    queued: TestClient, sim_fleet: None, agents: None, settings: Settings, tmp_path: Path
) -> None:
    with worker(tmp_path / "w.log", **FAST):
        assert apply(queued, cluster_doc("east", 3), cluster_doc("west", 3)).status_code == 200
        push_versions_async(queued, "1.0.0")
        resp = apply(queued, rollout_doc("d", "1.0.0"))
        assert resp.status_code == 200, resp.text
        wait_for(lambda: phase(queued, "d") == "Succeeded", 90, "Succeeded")
    assert set(running_versions(settings, ["east", "west"]).values()) == {"1.0.0"}


def test_worker_killed_mid_step_loses_nothing(
    queued: TestClient,
    sim_fleet: None,
    agents: None,
    engine: Engine,
    settings: Settings,
    tmp_path: Path,
) -> None:
    log = tmp_path / "first.log"
    # The worker kills itself (SIGKILL, its whole process group) inside its second step,
    # right after telling the clusters to run the new version: the rollout row locked,
    # the step's transaction open (controller/faults.py).
    with worker(log, EDGEFLEET_FAULTS="rollout.nodes.pushed=2*kill", **FAST) as proc:
        apply(queued, cluster_doc("east", 3), cluster_doc("west", 3))
        push_versions_async(queued, "1.0.0")
        apply(queued, rollout_doc("d", "1.0.0"))
        assert proc.wait(60) == -signal.SIGKILL
    assert "edgefleet fault point rollout.nodes.pushed: kill (hit 2)" in log.read_text()
    killed_at = reasons(engine, "d")
    # The killed step's transaction rolled back: the rollout is where the first step left it.
    assert phase(queued, "d") == "Progressing"
    assert ("WaveStarted", 0) in killed_at
    assert ("GatePassed", 0) not in killed_at

    with worker(tmp_path / "second.log", **FAST):
        celery_app.send_task("rollouts.tick")  # what beat sends every 10 s
        wait_for(lambda: phase(queued, "d") == "Succeeded", 120, "Succeeded after the kill")
    events = reasons(engine, "d")
    assert events[: len(killed_at)] == killed_at  # nothing committed was lost or rewritten
    counts = Counter(events)
    waves = queued.get("/v1/rollouts/d").json()["waves"]
    for wave in range(waves):
        assert counts[("WaveStarted", wave)] == 1, events
        assert counts[("GatePassed", wave)] == 1, events
    assert counts[("Started", None)] == 1
    assert counts[("Succeeded", None)] == 1
    assert set(running_versions(settings, ["east", "west"]).values()) == {"1.0.0"}


def push_versions_async(client: TestClient, version: str) -> None:
    """Push through the API; the worker validates it (not eager here)."""
    from controller.registry import samples

    resp = client.post(
        "/v1/models/detector/versions",
        data={"version": version},
        files={"file": ("m.onnx", samples.build_cnn(), "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text
    wait_for(
        lambda: client.get(f"/v1/models/detector/versions/{version}").json()["status"] == "Ready",
        60,
        "validation",
    )
