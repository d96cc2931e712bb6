"""A real Celery worker's /metrics (``edgefleet worker`` with
``EDGEFLEET_WORKER_METRICS_PORT``): the counters its pool's child processes increment,
summed by its main process and scraped over HTTP, against an independent count: the
event log of the rollout it drove and the versions it validated."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from controller.db.models import Event, ModelVersion, Rollout, VersionStatus, Wave
from controller.settings import Settings
from controller.tasks.celery_app import celery_app
from controller.tasks.worker_metrics import DIR_NAME
from tests.conftest import bearer
from tests.live import free_port, repeating
from tests.rollouts.helpers import apply, cluster_doc, rollout_doc
from tests.rollouts.test_worker import agents, push_versions_async
from tests.tasks.test_restarts import process
from tests.tasks.test_worker import queued, wait_for

__all__ = ["agents", "queued"]  # the fixtures, re-exported for pytest

NO_TOKEN = {"Authorization": ""}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.contextmanager
def worker_with_exporter(tmp: Path, *flags: str) -> Iterator[str]:
    """``edgefleet worker --concurrency 2`` with its exporter on a free loopback port, in
    a temporary directory of its own (its metrics files go there); yields the URL."""
    port = free_port()
    tmp.mkdir()
    env = {
        "EDGEFLEET_TASKS_EAGER": "false",
        "EDGEFLEET_RECONCILE_INTERVAL_S": "0.2",
        "EDGEFLEET_WORKER_METRICS_PORT": str(port),
        "TMPDIR": str(tmp),
    }
    argv = ["worker", "--concurrency", "2", *flags]
    with process(argv, tmp / "worker.log", env, "ready."):
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: _answers(url), 30, "the worker's exporter")
        yield url
    text = (tmp / "worker.log").read_text()
    assert "Traceback" not in text, text[-4000:]


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
    except httpx.TransportError:
        return False
    return True


def scrape(url: str) -> Samples:
    resp = httpx.get(url, headers=bearer("viewer"), timeout=10)
    assert resp.status_code == 200, resp.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def by_label(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(v for _, v in labels): value for (n, labels), value in samples.items() if n == name
    }


def transitions_in_the_log(engine: Engine) -> Counter[tuple[str, str]]:
    """Rollout phase transitions as the event log records them (``data.from`` and
    ``data.to`` both phases; a node move's ``from`` is a count per state)."""
    with engine.connect() as conn:
        data = conn.scalars(select(Event.data).where(Event.rollout_id.is_not(None))).all()
    return Counter(
        (d["from"], d["to"])
        for d in data
        if d and isinstance(d.get("from"), str) and isinstance(d.get("to"), str)
    )


def gate_events(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        reasons = conn.scalars(
            select(Event.reason).where(Event.reason.in_(("GatePassed", "GateFailed")))
        ).all()
    return Counter(reasons)


def drive_a_rollout(queued: TestClient) -> None:
    assert apply(queued, cluster_doc("east", 3), cluster_doc("west", 3)).status_code == 200
    push_versions_async(queued, "1.0.0")
    resp = apply(queued, rollout_doc("d", "1.0.0"))
    assert resp.status_code == 200, resp.text
    wait_for(lambda: queued.get("/v1/rollouts/d").json()["phase"] == "Succeeded", 120, "Succeeded")


def _last_tick(url: str) -> float:
    times = by_label(scrape(url), "edgefleet_periodic_task_last_success_timestamp_seconds")
    return times.get(("rollouts.tick",), 0.0)


def check_counts_against_the_log(samples: Samples, engine: Engine) -> None:
    transitions = by_label(samples, "edgefleet_rollout_transitions_total")
    logged = transitions_in_the_log(engine)
    assert logged[("Pending", "Progressing")] == logged[("Progressing", "Succeeded")] == 1
    assert {k: v for k, v in transitions.items() if v} == {k: float(v) for k, v in logged.items()}
    gates = by_label(samples, "edgefleet_gate_evaluations_total")
    events = gate_events(engine)
    with engine.connect() as conn:
        waves = conn.scalar(
            select(func.count()).select_from(Wave).join(Rollout).where(Rollout.name == "d")
        )
    assert events["GatePassed"] == waves == 3
    assert gates.get(("pass",), 0.0) == events["GatePassed"]
    assert gates.get(("fail",), 0.0) == events["GateFailed"] == 0
    with engine.connect() as conn:
        ready = conn.scalar(
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.status == VersionStatus.READY)
        )
    validations = by_label(samples, "edgefleet_model_validations_total")
    assert ready == 1
    assert validations == {("passed",): 1.0}


def test_the_workers_exporter_sums_its_children_and_wants_a_token(
    queued: TestClient, sim_fleet: None, agents: None, engine: Engine, tmp_path: Path
) -> None:
    with worker_with_exporter(tmp_path / "w") as url:
        drive_a_rollout(queued)
        samples = scrape(url)
        anonymous = httpx.get(url, headers=NO_TOKEN, timeout=10)
        # Beat's tick, as beat sends it: the time of its last success is exported, the
        # alert's input for a beat (or every worker) that stopped.
        sent = time.time()
        celery_app.send_task("rollouts.tick")
        wait_for(lambda: _last_tick(url) >= sent, 30, "the tick's time exported")
        assert _last_tick(url) <= time.time()
    check_counts_against_the_log(samples, engine)
    # Guarded as the API's /metrics is, with the same answer.
    api = queued.get("/metrics", headers=NO_TOKEN)
    assert anonymous.status_code == api.status_code == 401
    assert anonymous.json() == api.json()
    # The fleet gauges are the API's: counted in the database, not by the tasks.
    assert not any(name == "edgefleet_rollouts" for name, _ in samples)


def test_counts_of_replaced_children_are_kept_once(
    queued: TestClient, sim_fleet: None, agents: None, engine: Engine, tmp_path: Path
) -> None:
    """Each child runs one task and exits (``--max-tasks-per-child 1``): a rollout runs
    in dozens of processes, most gone by the scrape, and still every transition and
    gate decision is there exactly once. Prometheus scrapes all along, so children are
    forked from a main process whose token look-ups hold database connections: each
    child must leave those to its parent (a log without a traceback says none broke)."""
    with worker_with_exporter(tmp_path / "w", "--max-tasks-per-child", "1") as url:
        with repeating(lambda: scrape(url), 0.1):
            drive_a_rollout(queued)
        samples = scrape(url)
    check_counts_against_the_log(samples, engine)
    files = list((tmp_path / "w" / DIR_NAME).glob("counter_*.db"))
    assert len(files) > 4, files  # children were replaced while the rollout ran


def test_a_second_worker_on_the_same_directory_refuses_to_start(
    settings: Settings, redis_available: None, tmp_path: Path
) -> None:
    """Starting would empty the directory, and with it the first worker's counts."""
    with worker_with_exporter(tmp_path / "w"):
        second = subprocess.run(
            [sys.executable, "-m", "controller.cli.main", "worker", "--concurrency", "1"],
            env={
                **os.environ,
                "EDGEFLEET_TASKS_EAGER": "false",
                "EDGEFLEET_WORKER_METRICS_PORT": str(free_port()),
                "TMPDIR": str(tmp_path / "w"),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert "give each a TMPDIR of its own" in second.stderr
        assert (tmp_path / "w" / DIR_NAME).is_dir()  # the first one's, left alone
