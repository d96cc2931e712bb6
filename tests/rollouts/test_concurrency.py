"""Reconcilers that really overlap: real, separately committed transactions (the
``committed_client`` fixture), one connection per thread, so the rollout's row lock and
SKIP LOCKED decide who steps, not the test harness."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from controller.db.models import Event, RolloutPhase
from controller.db.session import lock_conflict, session_scope
from controller.rollouts import repository as repo
from controller.rollouts.reconciler import reconcile
from controller.rollouts.state import transition
from controller.settings import Settings
from tests.rollouts.faulty import install
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    drive,
    node_states,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
)

CLUSTERS = (("east", 3), ("west", 3))
TERMINAL = ("Succeeded", "RolledBack", "Aborted", "Failed", "Paused")


@pytest.fixture
def fleet(committed_client: TestClient, sim_fleet: None) -> TestClient:
    resp = apply(committed_client, *(cluster_doc(c, n) for c, n in CLUSTERS))
    assert resp.status_code == 200, resp.text
    push_versions(committed_client, "1.0.0")
    return committed_client


def rollout_events(name: str) -> list[tuple[str, dict[str, Any]]]:
    with session_scope() as s:
        rows = s.execute(
            select(Event.reason, Event.data)
            .where(Event.rollout_id == rollout_id(name))
            .order_by(Event.id)
        ).all()
        return [(r[0], r[1] or {}) for r in rows]


def test_second_reconciler_of_a_rollout_steps_aside(
    fleet: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {"strategy": {"steps": [{"percent": 100, "bake": "1h"}], "maxUnavailable": "100%"}}
    assert apply(fleet, rollout_doc("d", "1.0.0", **spec)).status_code == 200
    rid = rollout_id("d")
    faults = install(monkeypatch)
    inside, release = threading.Event(), threading.Event()
    steps = Counter[str]()
    guard = threading.Lock()

    def hold_first_step(cluster: str, what: str) -> None:
        # One observe of "east" per step: count the steps, and keep the first one inside
        # its transaction (the rollout row locked) until the other reconciler is done.
        if (cluster, what) != ("east", "observe"):
            return
        with guard:
            steps["east"] += 1
            first = steps["east"] == 1
        if first:
            inside.set()
            assert release.wait(30)

    faults.hook = hold_first_step
    start = threading.Barrier(2)
    results: queue.Queue[tuple[str, str | BaseException | None]] = queue.Queue()

    def reconciler(name: str) -> None:
        start.wait(10)
        try:
            results.put((name, reconcile(rid, settings)))
        except BaseException as exc:
            results.put((name, exc))

    threads = [threading.Thread(target=reconciler, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    assert inside.wait(30), "no reconciler reached the cluster"
    # The other one ran while the first held the lock: it returned without a step.
    first_done = results.get(timeout=30)
    release.set()
    for t in threads:
        t.join(30)
    second_done = results.get(timeout=1)
    assert first_done[1] is None, first_done
    assert second_done[1] == "Progressing", second_done
    assert steps["east"] == 1  # exactly one step ran


def test_concurrent_reconcilers_never_step_a_rollout_together(
    fleet: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {
        "strategy": {
            "steps": [{"nodes": 1}, {"percent": 50}, {"percent": 100}],
            "maxUnavailable": "34%",  # 2 of 6 at a time: several steps per wave
        }
    }
    faults = install(monkeypatch)
    # Every cluster call takes a little while, so steps overlap in time.
    faults.hook = lambda cluster, what: time.sleep(0.005)
    assert apply(fleet, rollout_doc("d", "1.0.0", **spec)).status_code == 200
    rid = rollout_id("d")
    done = threading.Event()
    errors: list[BaseException] = []
    outcomes = Counter[str]()
    guard = threading.Lock()

    def reconciler() -> None:
        try:
            for _ in range(400):
                if done.is_set():
                    return
                phase = reconcile(rid, settings)
                with guard:
                    outcomes[phase or "skipped"] += 1
                if phase in TERMINAL:
                    done.set()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    def agents() -> None:
        try:
            while not done.wait(0.02):
                report()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=reconciler) for _ in range(8)]
    threads.append(threading.Thread(target=agents))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert outcomes["Succeeded"] >= 1, outcomes
    assert set(node_states("d").values()) == {"Healthy"}

    events = rollout_events("d")
    counts = Counter((reason, data.get("wave")) for reason, data in events)
    for wave in range(3):
        assert counts[("WaveStarted", wave)] == 1, events
        assert counts[("GatePassed", wave)] == 1, events
    assert counts[("Started", None)] == 1
    assert counts[("Succeeded", None)] == 1
    # Each node moved through each state once: no step repeated another's transition.
    for reason in ("Applying", "WorkloadReady", "MetricsHealthy"):
        nodes = [n for r, data in events if r == reason for n in data["nodes"]]
        assert sorted(nodes) == sorted(set(nodes)), (reason, nodes)
        assert len(nodes) == 6, (reason, nodes)
    assert outcomes["skipped"] > 0, outcomes  # they did overlap: some stepped aside


def test_heartbeats_never_deadlock_with_a_step_writing_assignments_out_of_order(
    fleet: TestClient, settings: Settings
) -> None:
    """Agents' heartbeats (one batch for every node, its metric windows written in
    assignment id order) against a step that changes the same assignments flush by
    flush in the opposite order, as the reconciler's phases do: neither waits for the
    other in a cycle, so Postgres never picks a deadlock victim (it did, seen as 500s
    to the agents in every real-node run)."""
    assert apply(fleet, rollout_doc("d", "1.0.0")).status_code == 200
    assert drive("d", settings)[-1] == "Succeeded"
    rid = rollout_id("d")
    rounds = 150
    done = threading.Event()
    start = threading.Barrier(2)
    deadlocks = Counter[str]()
    errors: list[BaseException] = []

    def stepper() -> None:
        start.wait(10)
        for i in range(rounds):
            try:
                with session_scope() as s:
                    for row in reversed(repo.rows_of(s, rid)):
                        row.assignment.message = f"step {i}"
                        s.flush()
            except DBAPIError as exc:
                if not lock_conflict(exc):
                    raise
                deadlocks["step"] += 1
        done.set()

    def agents() -> None:
        start.wait(10)
        while not done.is_set():
            try:
                assert report() == 6
            except DBAPIError as exc:
                if not lock_conflict(exc):
                    raise
                deadlocks["heartbeat"] += 1

    def run(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=run, args=(f,)) for f in (stepper, agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert deadlocks.total() == 0, f"{dict(deadlocks)} of {rounds} steps deadlocked"
    with session_scope() as s:
        assert {r.assignment.message for r in repo.rows_of(s, rid)} == {f"step {rounds - 1}"}


def test_an_apply_waits_for_a_step_and_reads_the_rollout_as_the_step_left_it(
    fleet: TestClient, settings: Settings
) -> None:
    """A re-apply while a step holds the rollout (it is starting it: Pending ->
    Progressing) waits for the row lock and reads the rollout under it: the new spec is
    refused as a change mid-flight, not written over a rollout that just started (read
    without the lock, the apply saw Pending and replaced the plan once the step
    committed)."""
    assert apply(fleet, rollout_doc("d", "1.0.0")).status_code == 200
    assert drive("d", settings)[-1] == "Succeeded"
    with session_scope() as s:  # re-applied: Pending, its step not yet run
        r = repo.lock(s, "d")
        assert r is not None
        transition(s, r, RolloutPhase.PENDING, reason="Reapplied", message="generation 2")
    started, release = threading.Event(), threading.Event()

    def step() -> None:
        with session_scope() as s:
            r = repo.lock(s, "d")
            assert r is not None
            transition(s, r, RolloutPhase.PROGRESSING, reason="Started", message="wave 0")
            s.flush()
            started.set()
            assert release.wait(30)

    answers: queue.Queue[Any] = queue.Queue()
    changed = rollout_doc("d", "1.0.0", strategy={"steps": [{"percent": 100}]})
    stepper = threading.Thread(target=step)
    applier = threading.Thread(target=lambda: answers.put(apply(fleet, changed)))
    stepper.start()
    try:
        assert started.wait(30)
        applier.start()
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with session_scope() as s:
                if s.scalar(waiting):
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the apply never waited for the step's lock")
    finally:
        release.set()
        stepper.join(30)
    applier.join(30)
    resp = answers.get(timeout=1)
    assert resp.status_code == 409, resp.text
    assert "is Progressing: its spec cannot change mid-flight" in resp.text
    with session_scope() as s:
        r = repo.get(s, "d")
        assert r is not None
        assert (r.phase, r.generation) == ("Progressing", 1)
