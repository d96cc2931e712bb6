"""The reconciler's failure paths, driven through a real rollout: clusters that fail
(transiently, permanently) while a step applies or observes, a revert that cannot
reach every node at once, workloads that never become ready, agents that fall silent,
and drift repair against clusters that refuse.

Faults come from a small test driver wrapped around the simulated one
(tests/rollouts/faulty.py): everything above the driver is the product's own code."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.db.base import utcnow
from controller.db.models import Assignment, Event, Node
from controller.db.session import session_scope
from controller.fleet import service as fleet_service
from controller.kube.driver import DriverError
from controller.rollouts import reconciler
from controller.settings import Settings
from node_agent.contract import Heartbeat
from tests.rollouts.faulty import Faults, install, permanent, transient
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    drive,
    node_states,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
    running_versions,
)

CLUSTERS = ("berlin", "paris")
PARIS = {"paris-n0", "paris-n1"}
# One wave of every node at once: each step touches both clusters.
ONE_WAVE = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%"}}


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return install(monkeypatch)


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None, faults: Faults) -> TestClient:
    """Two simulated sites of 2 nodes each, detector 1.0.0 and 2.0.0 registered."""
    resp = apply(client, *(cluster_doc(c, 2) for c in CLUSTERS))
    assert resp.status_code == 200, resp.text
    push_versions(client, "1.0.0", "2.0.0")
    return client


def events(*, rollout: str | None = None, kind: str | None = None) -> list[tuple[str, Any]]:
    """(reason, data) of the events of one rollout or one object kind, oldest first."""
    with session_scope() as s:
        stmt = select(Event.reason, Event.data).order_by(Event.id)
        if rollout is not None:
            stmt = stmt.where(Event.rollout_id == rollout_id(rollout))
        if kind is not None:
            stmt = stmt.where(Event.object_kind == kind)
        return [(r[0], r[1]) for r in s.execute(stmt)]


def reasons(rollout: str) -> list[str]:
    return [r for r, _ in events(rollout=rollout)]


def phase_of(client: TestClient, name: str) -> str:
    result: str = client.get(f"/v1/rollouts/{name}").json()["phase"]
    return result


# ---------------------------------------------------------------- apply and observe


def test_transient_apply_error_keeps_nodes_applying_and_retries(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    faults.apply["paris"] = transient()
    apply(fleet, rollout_doc("d", "1.0.0", **ONE_WAVE))  # the eager first step
    reconciler.reconcile(rollout_id("d"), settings)
    states = node_states("d")
    # Berlin moved on; Paris is retried, not failed.
    assert {n: s for n, s in states.items() if n in PARIS} == dict.fromkeys(PARIS, "Applying")
    assert {s for n, s in states.items() if n not in PARIS} == {"Running"}
    assert phase_of(fleet, "d") == "Progressing"
    errors = [d for r, d in events(rollout="d") if r == "DriverError"]
    assert errors
    assert all(d["transient"] is True for d in errors)
    assert "ClusterRefused" not in reasons("d")

    faults.apply.clear()
    assert drive("d", settings)[-1] == "Succeeded"
    assert running_versions(settings, CLUSTERS) == {
        f"{c}-n{i}": "1.0.0" for c in CLUSTERS for i in range(2)
    }


def test_permanent_apply_error_fails_the_refused_nodes(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    faults.apply["paris"] = permanent()
    apply(fleet, rollout_doc("d", "1.0.0", onFailure="pause", **ONE_WAVE))
    refused = [d for r, d in events(rollout="d") if r == "ClusterRefused"]
    assert len(refused) == 1
    assert sorted(refused[0]["nodes"]) == sorted(f"paris/{n}" for n in PARIS)
    assert refused[0]["from"] == {"Applying": 2}
    states = node_states("d")
    assert {states[n] for n in PARIS} == {"Failed"}
    # Two of four nodes failed: the gate (minHealthyRatio 1.0) fails the wave at once,
    # and onFailure: pause waits for a human.
    assert phase_of(fleet, "d") == "Paused"
    assert "GateFailed" in reasons("d")
    assert running_versions(settings, CLUSTERS) == {"berlin-n0": "1.0.0", "berlin-n1": "1.0.0"}


def test_transient_observe_error_holds_the_nodes_until_the_cluster_answers(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    faults.observe["paris"] = transient("API server unreachable: connection refused")
    apply(fleet, rollout_doc("d", "1.0.0", **ONE_WAVE))
    for _ in range(3):
        assert reconciler.reconcile(rollout_id("d"), settings) == "Progressing"
        report()
    states = node_states("d")
    # The workload was applied, but nobody saw it Ready: not Running, and not Failed
    # either (an unanswered observe says nothing about the node).
    assert {states[n] for n in PARIS} == {"Applying"}
    assert {s for n, s in states.items() if n not in PARIS} == {"Healthy"}
    assert ("paris", "observe") in faults.calls
    blind = [d for r, d in events(rollout="d") if r == "DriverError"]
    assert blind
    assert all(d["call"] == "observe" and d["nodes"] == 2 for d in blind)
    assert "ClusterRefused" not in reasons("d")

    faults.observe.clear()
    assert drive("d", settings)[-1] == "Succeeded"
    assert set(node_states("d").values()) == {"Healthy"}


def test_a_cluster_that_stays_unreachable_is_recorded_once_until_something_else_happens(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    """Every step observes the unreachable cluster again, but its DriverError is recorded
    once, not once a step (beat steps a held revert every 10 s: 8,640 events a day), and
    again as soon as anything else happened to the rollout."""
    faults.observe["paris"] = transient("API server unreachable: connection refused")
    apply(fleet, rollout_doc("d", "1.0.0", **ONE_WAVE))  # the eager first step
    for _ in range(5):
        assert reconciler.reconcile(rollout_id("d"), settings) == "Progressing"
    assert faults.calls.count(("paris", "observe")) == 6  # it failed at every step
    # Six observes failed: recorded in the first step, then once more only because
    # Berlin's nodes were seen ready after it; steps 3 to 6 added nothing.
    assert reasons("d")[-3:] == ["DriverError", "WorkloadReady", "DriverError"]
    errors = [d for r, d in events(rollout="d") if r == "DriverError"]
    assert errors == [{"cluster": "paris", "call": "observe", "transient": True, "nodes": 2}] * 2

    for command in ("pause", "resume"):  # something else happens: two events
        assert fleet.post(f"/v1/rollouts/d/{command}").status_code == 202
    assert reconciler.reconcile(rollout_id("d"), settings) == "Progressing"
    log = reasons("d")
    assert log.count("DriverError") == 3
    assert log[-1] == "DriverError"  # recorded again, after the commands

    faults.observe.clear()
    report()
    assert drive("d", settings)[-1] == "Succeeded"


def test_permanent_observe_error_fails_the_nodes_it_hides_at_once(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    """A cluster that refuses to say what runs (403: the driver may not read pods) will
    not say it next step either: its nodes still applying fail in the step that asked,
    the cluster's answer in the event and on each node, instead of holding until the
    progress deadline (15 minutes by default)."""
    faults.observe["paris"] = permanent("403 Forbidden: pods is forbidden")
    apply(fleet, rollout_doc("d", "1.0.0", onFailure="pause", **ONE_WAVE))  # the first step
    refused = [d for r, d in events(rollout="d") if r == "ClusterRefused"]
    assert len(refused) == 1, refused
    assert sorted(refused[0]["nodes"]) == sorted(f"paris/{n}" for n in PARIS)
    assert refused[0]["from"] == {"Applying": 2}
    assert (refused[0]["cluster"], refused[0]["call"], refused[0]["error"]) == (
        "paris",
        "observe",
        "403 Forbidden: pods is forbidden",
    )
    states = node_states("d")
    assert {states[n] for n in PARIS} == {"Failed"}
    assert {s for n, s in states.items() if n not in PARIS} == {"Running"}
    with session_scope() as s:
        messages = s.execute(
            select(Node.name, Assignment.message)
            .join(Assignment, Assignment.node_id == Node.id)
            .where(Assignment.rollout_id == rollout_id("d"), Node.name.in_(PARIS))
        ).all()
    assert {m for _, m in messages} == {
        "cluster paris refused to report it: 403 Forbidden: pods is forbidden"
    }
    # Two of four nodes failed: the gate fails the wave in the same step, not the deadline.
    assert phase_of(fleet, "d") == "Paused"
    assert "GateFailed" in reasons("d")
    assert "ProgressDeadlineExceeded" not in reasons("d")


def test_permanent_observe_error_keeps_nodes_already_seen_ready(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    """Nodes seen Ready before the cluster stopped answering are judged by their
    heartbeats, as every node past Applying is: a refusal says nothing new about them."""
    baking = {"strategy": {"steps": [{"percent": 100, "bake": "1h"}], "maxUnavailable": "100%"}}
    apply(fleet, rollout_doc("d", "1.0.0", **baking))  # every node Running
    faults.observe["paris"] = permanent("403 Forbidden: pods is forbidden")
    for _ in range(2):
        report()
        assert reconciler.reconcile(rollout_id("d"), settings) == "Progressing"
    assert ("paris", "observe") in faults.calls
    assert set(node_states("d").values()) == {"Healthy"}
    assert "ClusterRefused" not in reasons("d")


def test_progress_deadline_names_the_cluster_that_could_not_be_observed(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    faults.observe["paris"] = transient("503 Service Unavailable: etcdserver: leader changed")
    spec = {"strategy": {**ONE_WAVE["strategy"], "progressDeadline": "2m"}}
    apply(fleet, rollout_doc("d", "1.0.0", onFailure="pause", **spec))
    rid = rollout_id("d")
    report()
    assert reconciler.reconcile(rid, settings, now=utcnow() + timedelta(minutes=3)) == "Paused"
    failed = [d for r, d in events(rollout="d") if r == "ProgressDeadlineExceeded"]
    assert len(failed) == 1
    assert sorted(failed[0]["gate"]["applying_nodes"]) == sorted(f"paris/{n}" for n in PARIS)
    assert failed[0]["gate"]["unobserved_clusters"] == {
        "paris": "503 Service Unavailable: etcdserver: leader changed"
    }
    with session_scope() as s:
        message = s.scalars(
            select(Event.message).where(
                Event.rollout_id == rid, Event.reason == "ProgressDeadlineExceeded"
            )
        ).one()
    assert (
        "could not observe cluster paris (503 Service Unavailable: etcdserver: leader changed)"
        in message
    )


# ---------------------------------------------------------------- reverting


def _failed_rollout_reverting(fleet: TestClient, faults: Faults, settings: Settings) -> None:
    """d1 (1.0.0) succeeded everywhere; d2 (2.0.0) reaches every node and fails its gate
    while Paris does not answer the revert."""
    apply(fleet, rollout_doc("d1", "1.0.0", **ONE_WAVE))
    assert drive("d1", settings)[-1] == "Succeeded"
    apply(fleet, rollout_doc("d2", "2.0.0", **ONE_WAVE))
    reconciler.reconcile(rollout_id("d2"), settings)  # every node runs 2.0.0 now
    assert set(running_versions(settings, CLUSTERS).values()) == {"2.0.0"}
    report(lambda n: (10.0, 50))  # 50 % errors: the gate fails


@pytest.mark.parametrize("error", [transient(), permanent()], ids=["transient", "permanent"])
def test_incomplete_revert_is_retried_until_every_node_is_back(
    fleet: TestClient, faults: Faults, settings: Settings, error: DriverError
) -> None:
    _failed_rollout_reverting(fleet, faults, settings)
    faults.apply["paris"] = error
    rid = rollout_id("d2")
    assert reconciler.reconcile(rid, settings) == "RolledBack"
    states = node_states("d2")
    # Only what really went back says so: Paris still runs 2.0.0.
    assert {n: states[n] for n in states if n not in PARIS} == dict.fromkeys(
        ("berlin-n0", "berlin-n1"), "RolledBack"
    )
    assert {states[n] for n in PARIS} != {"RolledBack"}
    assert running_versions(settings, CLUSTERS) == {
        "berlin-n0": "1.0.0",
        "berlin-n1": "1.0.0",
        "paris-n0": "2.0.0",
        "paris-n1": "2.0.0",
    }
    assert "revert incomplete" in fleet.get("/v1/rollouts/d2").json()["message"]
    with session_scope() as s:
        from controller.rollouts import repository as repo

        assert rid in repo.to_reconcile(s)  # beat's tick keeps retrying it

    assert reconciler.reconcile(rid, settings) == "RolledBack"  # still refused: no harm
    assert {node_states("d2")[n] for n in PARIS} != {"RolledBack"}
    # A retry now would start over on nodes still running 2.0.0: refused, saying why.
    early = fleet.post("/v1/rollouts/d2/retry")
    assert early.status_code == 409
    detail = early.json()["detail"]
    assert "still reverting: 2 node(s) not back on their previous version" in detail
    assert "paris/paris-n0" in detail
    assert phase_of(fleet, "d2") == "RolledBack"

    faults.apply.clear()
    assert reconciler.reconcile(rid, settings) == "RolledBack"
    assert set(node_states("d2").values()) == {"RolledBack"}
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}
    with session_scope() as s:
        from controller.rollouts import repository as repo

        assert rid not in repo.to_reconcile(s)
    rolled = [d for r, d in events(rollout="d2") if r == "RolledBack"]
    # Each node reported back exactly once: Berlin first, Paris after the retry.
    assert sorted(n for d in rolled for n in d["nodes"]) == sorted(
        f"{c}/{c}-n{i}" for c in CLUSTERS for i in range(2)
    )
    assert fleet.post("/v1/rollouts/d2/retry").status_code == 202  # the revert has finished
    assert phase_of(fleet, "d2") != "RolledBack"


def test_a_revert_a_cluster_will_not_report_says_why_it_waits(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    """A rollback on a cluster that refuses to report (a 403: the driver lost the right to
    read pods) cannot be verified there: its nodes stay Reverting, and the rollout's
    message and a refused retry name the cluster and its answer, so the operator knows
    the fix is on the cluster's side; once it answers, the revert finishes."""
    apply(fleet, rollout_doc("d1", "1.0.0", **ONE_WAVE))
    assert drive("d1", settings)[-1] == "Succeeded"
    faults.observe["paris"] = permanent("403 Forbidden: pods is forbidden")
    apply(fleet, rollout_doc("d2", "2.0.0", **ONE_WAVE))  # Paris fails, Berlin reverts
    rid = rollout_id("d2")
    for _ in range(2):
        assert reconciler.reconcile(rid, settings) == "RolledBack"
    assert {node_states("d2")[n] for n in PARIS} == {"Reverting"}
    why = "could not observe cluster paris (403 Forbidden: pods is forbidden)"
    message = fleet.get("/v1/rollouts/d2").json()["message"]
    assert message == f"reverting: 2 node(s) not yet seen on their previous version; {why}"
    early = fleet.post("/v1/rollouts/d2/retry")
    assert early.status_code == 409
    assert why in early.json()["detail"]

    faults.observe.clear()  # the cluster's RBAC repaired
    assert reconciler.reconcile(rid, settings) == "RolledBack"
    assert set(node_states("d2").values()) == {"RolledBack"}
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}
    assert fleet.post("/v1/rollouts/d2/retry").status_code == 202


# ---------------------------------------------------------------- progress deadline


def test_progress_deadline_fails_a_wave_with_nodes_stuck_applying(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    faults.stuck.add("paris-n1")
    spec = {
        "strategy": {
            "steps": [{"percent": 100}],
            "maxUnavailable": "100%",
            "progressDeadline": "2m",
        },
        "gates": {"maxP95LatencyMs": 40, "minHealthyRatio": 0.5, "minSamples": 20},
    }
    apply(fleet, rollout_doc("d", "1.0.0", onFailure="pause", **spec))
    rid = rollout_id("d")
    for _ in range(3):
        assert reconciler.reconcile(rid, settings) == "Progressing"
        report()
    assert node_states("d")["paris-n1"] == "Applying"
    # Still within the deadline: the wave holds (3 of 4 healthy is enough for 0.5, but a
    # wave passes only once none of its nodes is still applying).
    assert (
        reconciler.reconcile(rid, settings, now=utcnow() + timedelta(seconds=90)) == "Progressing"
    )
    assert "ProgressDeadlineExceeded" not in reasons("d")

    assert reconciler.reconcile(rid, settings, now=utcnow() + timedelta(minutes=3)) == "Paused"
    failed = [d for r, d in events(rollout="d") if r == "ProgressDeadlineExceeded"]
    assert len(failed) == 1
    assert failed[0]["gate"]["applying_nodes"] == ["paris/paris-n1"]
    body = fleet.get("/v1/rollouts/d").json()
    assert body["wave_detail"][0]["phase"] == "Failed"
    assert "GatePassed" not in reasons("d")


def test_a_node_stuck_applying_is_named_when_the_gate_fails_on_silence(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    """With every node required healthy (the default ratio), the stuck node also makes
    the gate fail for silence at the deadline; the failure still names the cause, the
    node that never ran the new version, not a gate its numbers failed."""
    faults.stuck.add("paris-n1")
    spec = {
        "strategy": {
            "steps": [{"percent": 100}],
            "maxUnavailable": "100%",
            "progressDeadline": "2m",
        },
        "gates": {"maxP95LatencyMs": 40, "minSamples": 20},
    }
    resp = apply(fleet, rollout_doc("d", "1.0.0", onFailure="pause", **spec))
    assert resp.status_code == 200, resp.text
    rid = rollout_id("d")
    for _ in range(3):
        assert reconciler.reconcile(rid, settings) == "Progressing"
        report()
    assert reconciler.reconcile(rid, settings, now=utcnow() + timedelta(minutes=3)) == "Paused"
    failed = [d for r, d in events(rollout="d") if r == "ProgressDeadlineExceeded"]
    assert len(failed) == 1
    assert failed[0]["gate"]["applying_nodes"] == ["paris/paris-n1"]
    assert "GateFailed" not in reasons("d")


# ---------------------------------------------------------------- silent agents


def _beat(cluster: str, node: str, seq: int, *, at: Any) -> Heartbeat:
    return Heartbeat(cluster=cluster, node=node, seq=seq, sent_at=at)


def health(cluster: str) -> dict[str, str]:
    from controller.db.models import Cluster

    with session_scope() as s:
        rows = s.execute(
            select(Node.name, Node.health)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .where(Cluster.name == cluster)
        ).all()
        return {r[0]: r[1] for r in rows}


def test_mark_silent_nodes_turns_stopped_agents_stale_then_offline(
    fleet: TestClient, settings: Settings
) -> None:
    now = utcnow()
    stale_at = now - timedelta(seconds=settings.node_stale_s + 5)
    offline_at = now - timedelta(seconds=settings.node_offline_s + 5)
    with session_scope() as s:
        # Each node's agent beat once, at a time in the past (the heartbeat's arrival time
        # is what counts, so the ingestion clock is set back); berlin-n1 never beat.
        fleet_service.ingest_heartbeats(s, [_beat("paris", "paris-n0", 1, at=now)], now=now)
        fleet_service.ingest_heartbeats(
            s, [_beat("paris", "paris-n1", 1, at=stale_at)], now=stale_at
        )
        fleet_service.ingest_heartbeats(
            s, [_beat("berlin", "berlin-n0", 1, at=offline_at)], now=offline_at
        )
    assert set(health("paris").values()) | set(health("berlin").values()) == {"Ready"}

    with session_scope() as s:
        assert fleet_service.mark_silent_nodes(s, settings) == 2
    assert health("paris") == {"paris-n0": "Ready", "paris-n1": "Stale"}
    # A node whose agent never reported keeps the cluster's own Ready condition.
    assert health("berlin") == {"berlin-n0": "Offline", "berlin-n1": "Ready"}
    with session_scope() as s:
        assert fleet_service.mark_silent_nodes(s, settings) == 0  # nothing new: idempotent

    # Stale turns Offline once it has been silent long enough.
    later = offline_at - timedelta(seconds=1)
    with session_scope() as s:
        fleet_service.ingest_heartbeats(s, [_beat("paris", "paris-n1", 2, at=later)], now=later)
        assert fleet_service.mark_silent_nodes(s, settings) == 1
    assert health("paris")["paris-n1"] == "Offline"

    # The agent comes back: its next heartbeat makes the node Ready again.
    with session_scope() as s:
        fleet_service.ingest_heartbeats(s, [_beat("berlin", "berlin-n0", 2, at=now)], now=now)
        assert fleet_service.mark_silent_nodes(s, settings) == 0
    assert health("berlin")["berlin-n0"] == "Ready"


def test_node_marked_offline_by_silence_is_deferred_by_the_rollout(
    fleet: TestClient, settings: Settings
) -> None:
    long_ago = utcnow() - timedelta(seconds=settings.node_offline_s + 60)
    with session_scope() as s:
        fleet_service.ingest_heartbeats(
            s, [_beat("paris", "paris-n1", 1, at=long_ago)], now=long_ago
        )
        fleet_service.mark_silent_nodes(s, settings)
    spec = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%", "maxDeferred": 1}}
    apply(fleet, rollout_doc("d", "1.0.0", **spec))
    assert node_states("d")["paris-n1"] == "Deferred"
    assert drive("d", settings)[-1] == "Succeeded"
    assert "paris-n1" not in running_versions(settings, CLUSTERS)


# ---------------------------------------------------------------- drift repair


def _succeeded_everywhere(fleet: TestClient, settings: Settings) -> None:
    apply(fleet, rollout_doc("d", "1.0.0", **ONE_WAVE))
    assert drive("d", settings)[-1] == "Succeeded"


def _delete_behind_our_back(settings: Settings, *nodes: str) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url or "")
    for node in nodes:
        cluster = node.split("-")[0]
        client.hdel(f"{settings.sim_state_prefix}:{cluster}:detector", node)
    client.close()


def cluster_events(reason: str) -> list[tuple[str, Any]]:
    with session_scope() as s:
        rows = s.execute(
            select(Event.object_name, Event.data)
            .where(Event.object_kind == "Cluster", Event.reason == reason)
            .order_by(Event.id)
        ).all()
        return [(r[0], r[1]) for r in rows]


# Either cluster blind in turn: whichever repair_drift reaches first, the other is still
# checked and repaired.
@pytest.mark.parametrize(("blind", "seeing"), [("paris", "berlin"), ("berlin", "paris")])
def test_drift_check_failure_on_one_cluster_does_not_stop_the_others(
    fleet: TestClient, faults: Faults, settings: Settings, blind: str, seeing: str
) -> None:
    _succeeded_everywhere(fleet, settings)
    _delete_behind_our_back(settings, f"{blind}-n0", f"{seeing}-n0")
    faults.observe[blind] = transient("timed out")
    faults.calls.clear()
    with session_scope() as s:
        repaired = fleet_service.repair_drift(s, settings)
    assert repaired == {f"{seeing}/detector": [f"{seeing}-n0"]}
    assert [name for name, _ in cluster_events("DriftCheckFailed")] == [blind]
    assert f"{blind}-n0" not in running_versions(settings, CLUSTERS)
    assert (blind, "apply") not in faults.calls  # no repair from a blind check

    faults.observe.clear()
    with session_scope() as s:
        assert fleet_service.repair_drift(s, settings) == {f"{blind}/detector": [f"{blind}-n0"]}
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}
    assert len(running_versions(settings, CLUSTERS)) == 4


def test_drift_repair_failure_is_recorded_and_retried(
    fleet: TestClient, faults: Faults, settings: Settings
) -> None:
    _succeeded_everywhere(fleet, settings)
    _delete_behind_our_back(settings, "berlin-n1", "paris-n0", "paris-n1")
    faults.apply["paris"] = permanent("admission webhook denied the request")
    with session_scope() as s:
        repaired = fleet_service.repair_drift(s, settings)
    assert repaired == {"berlin/detector": ["berlin-n1"]}
    failed = cluster_events("DriftRepairFailed")
    assert [(name, data["nodes"]) for name, data in failed] == [("paris", ["paris-n0", "paris-n1"])]
    assert [name for name, _ in cluster_events("DriftRepaired")] == ["berlin"]
    assert set(running_versions(settings, CLUSTERS)) == {"berlin-n0", "berlin-n1"}

    faults.apply.clear()
    with session_scope() as s:
        assert fleet_service.repair_drift(s, settings) == {
            "paris/detector": ["paris-n0", "paris-n1"]
        }
    assert running_versions(settings, CLUSTERS) == {
        f"{c}-n{i}": "1.0.0" for c in CLUSTERS for i in range(2)
    }
