"""The rollout engine on a real Celery worker, real Redis and real Postgres: follow-up
steps are queued by the worker itself, and a worker killed inside a step loses nothing."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from controller.db.base import utcnow
from controller.db.models import Event, Rollout
from controller.rollouts import reconciler, step_schedule
from controller.settings import Settings
from controller.tasks.celery_app import celery_app, configure
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    drive,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
    running_versions,
)
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


ONE_WAVE = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%"}}
SITES = ("done", "lost", "paused", "closed", "frozen")


def on_site(name: str, site: str, **spec: Any) -> dict[str, Any]:
    return rollout_doc(
        name, "1.0.0", selector={"matchLabels": {"site": site}}, **{**ONE_WAVE, **spec}
    )


def rid(name: str) -> int:
    return rollout_id(name)


def evaluated_at(engine: Engine, name: str) -> datetime | None:
    with engine.connect() as conn:
        found: datetime | None = conn.scalar(
            select(Rollout.schedule_evaluated_at).where(Rollout.name == name)
        )
    return found


def test_beats_tick_steps_every_rollout_with_work_left(
    queued: TestClient,
    sim_fleet: None,
    agents: None,
    engine: Engine,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """Rollouts whose next step was lost (a worker gone, the follow-up with it), one
    waiting for its window, one whose freeze was lifted while its follow-up waited for
    the freeze's end: beat's tick (here, its call) finds each, a real worker steps them,
    and each goes on by its own follow-ups from there. A paused or finished rollout is
    left alone."""
    now = utcnow()
    configure(settings)  # set-up in process, eager: no follow-up is ever queued
    assert apply(queued, *(cluster_doc(c, 2) for c in SITES)).status_code == 200
    push_versions(queued, "1.0.0")
    assert apply(queued, on_site("done", "done")).status_code == 200
    assert drive("done", settings)[-1] == "Succeeded"
    assert apply(queued, on_site("lost", "lost")).status_code == 200
    assert (
        apply(
            queued,
            on_site(
                "paused",
                "paused",
                strategy={"steps": [{"percent": 100, "bake": "1h"}], "maxUnavailable": "100%"},
            ),
        ).status_code
        == 200
    )
    assert queued.post("/v1/rollouts/paused/pause").status_code == 202
    closed = {
        "timeZone": "UTC",
        "windows": [{"cron": f"0 {(now.hour + 2) % 24} * * *", "duration": "1h"}],
    }
    assert apply(queued, on_site("closed", "closed", schedule=closed)).status_code == 200
    assert phase(queued, "lost") == phase(queued, "closed") == "Progressing"
    freeze = {
        "name": "hold",
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(days=1)).isoformat(),
        "selector": {"matchLabels": {"site": "frozen"}},
    }
    assert queued.post("/v1/freezes", json=freeze).status_code == 201
    assert (
        apply(queued, on_site("frozen", "frozen", schedule={"timeZone": "UTC"})).status_code == 200
    )
    # Through Redis from here on. The frozen rollout's step queues its follow-up for
    # the freeze's end, a day away; then the freeze is lifted.
    configure(settings.model_copy(update={"tasks_eager": False, "reconcile_interval_s": 0.2}))
    assert (
        reconciler.reconcile(
            rid("frozen"), settings.model_copy(update={"reconcile_interval_s": 0.2})
        )
        == "Progressing"
    )
    assert queued.delete("/v1/freezes/hold").status_code == 200
    celery_app.control.purge()  # every queued step lost, as with a worker gone
    before = evaluated_at(engine, "closed")
    assert before is not None

    with worker(tmp_path / "w.log", **FAST):
        stepped = set(reconciler.tick(settings))  # what beat sends every 10 s
        assert stepped == {rid("lost"), rid("closed"), rid("frozen")}
        wait_for(lambda: phase(queued, "lost") == "Succeeded", 60, "lost: Succeeded")
        wait_for(lambda: phase(queued, "frozen") == "Succeeded", 60, "frozen: Succeeded")
        wait_for(lambda: (evaluated_at(engine, "closed") or before) > before, 30, "closed: stepped")
    assert phase(queued, "closed") == "Progressing"
    assert (queued.get("/v1/rollouts/closed").json()["message"] or "").startswith(
        step_schedule.WAITING
    )
    assert phase(queued, "paused") == "Paused"
    assert phase(queued, "done") == "Succeeded"
