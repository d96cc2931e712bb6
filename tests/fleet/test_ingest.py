"""Heartbeat ingestion: evidence carries the time it was measured."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select, text

from controller.db.models import Assignment, Node
from controller.db.session import session_scope
from controller.fleet.service import ingest_heartbeats
from controller.rollouts import reconciler
from controller.settings import Settings
from node_agent.contract import Heartbeat, InferenceMetrics, WorkloadReport
from tests.rollouts.helpers import apply, cluster_doc, push_versions, rollout_doc, rollout_id


def beat(node: str, seq: int, sent_at: datetime, sha: str, version: str) -> Heartbeat:
    metrics = InferenceMetrics(window_s=10, samples=100, p95_ms=5.0)
    workload = WorkloadReport(
        model="detector", version=version, sha256=sha, state="Ready", metrics=metrics
    )
    return Heartbeat(cluster="site", node=node, seq=seq, sent_at=sent_at, workloads=[workload])


def test_replayed_old_windows_are_not_fresh_evidence(
    client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    apply(client, cluster_doc("site", 1))
    push_versions(client, "1.0.0")
    apply(client, rollout_doc("d", "1.0.0", strategy={"steps": [{"percent": 100}]}))
    sha = client.get("/v1/models/detector/versions/1.0.0").json()["sha256"]
    reconciler.reconcile(rollout_id("d"), settings)  # the node runs the new version now
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    in_the_future = datetime.now(UTC) + timedelta(hours=1)
    with session_scope() as s:
        result = ingest_heartbeats(s, [beat("site-n0", 1, an_hour_ago, sha, "1.0.0")])
        assert result.accepted == 1
        metrics = s.scalars(
            select(Assignment.metrics).join(Node).where(Node.name == "site-n0")
        ).one()
        assert datetime.fromisoformat(metrics["reported_at"]) == an_hour_ago
    # Replayed numbers from before the wave started do not pass the gate.
    for _ in range(3):
        assert reconciler.reconcile(rollout_id("d"), settings) == "Progressing"
    with session_scope() as s:
        ingest_heartbeats(s, [beat("site-n0", 2, in_the_future, sha, "1.0.0")])
        metrics = s.scalars(
            select(Assignment.metrics).join(Node).where(Node.name == "site-n0")
        ).one()
        assert datetime.fromisoformat(metrics["reported_at"]) <= datetime.now(UTC)
    assert reconciler.reconcile(rollout_id("d"), settings) == "Succeeded"


def test_a_node_in_a_handover_is_judged_on_the_version_it_moves_to(
    client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    """Make before break: for a moment the node runs both versions and its agent reports
    both, in any order; the evidence is the desired version's."""
    apply(client, cluster_doc("site", 1))
    push_versions(client, "1.0.0", "2.0.0")
    old = client.get("/v1/models/detector/versions/1.0.0").json()["sha256"]
    new = client.get("/v1/models/detector/versions/2.0.0").json()["sha256"]
    apply(client, rollout_doc("d", "2.0.0", strategy={"steps": [{"percent": 100}]}))
    reconciler.reconcile(rollout_id("d"), settings)
    now = datetime.now(UTC)
    for seq, order in enumerate(([old, new], [new, old]), start=1):
        workloads = [
            WorkloadReport(
                model="detector",
                version="2.0.0" if sha == new else "1.0.0",
                sha256=sha,
                state="Ready",
                metrics=InferenceMetrics(
                    window_s=10, samples=100, p95_ms=5.0 if sha == new else 900.0
                ),
            )
            for sha in order
        ]
        with session_scope() as s:
            heartbeat = Heartbeat(
                cluster="site", node="site-n0", seq=seq, sent_at=now, workloads=workloads
            )
            assert ingest_heartbeats(s, [heartbeat]).accepted == 1
            metrics = s.scalars(
                select(Assignment.metrics).join(Node).where(Node.name == "site-n0")
            ).one()
        assert (metrics["sha256"], metrics["p95_ms"], metrics["on_desired"]) == (new, 5.0, True)


def test_a_window_for_an_assignment_a_step_holds_is_skipped_not_waited_for(
    committed_client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    """Another transaction (a step changing the node's state) holds one assignment row:
    the ingest neither waits for it nor fails; that node's window is not stored (its
    next heartbeat's will be), the other node's is, and both nodes are seen."""
    client = committed_client
    apply(client, cluster_doc("site", 2))
    push_versions(client, "1.0.0")
    apply(client, rollout_doc("d", "1.0.0", strategy={"steps": [{"percent": 100}]}))
    sha = client.get("/v1/models/detector/versions/1.0.0").json()["sha256"]
    reconciler.reconcile(rollout_id("d"), settings)
    now = datetime.now(UTC)
    beats = [beat(n, 1, now, sha, "1.0.0") for n in ("site-n0", "site-n1")]
    with session_scope() as step:
        held = step.scalars(
            select(Assignment)
            .join(Node)
            .where(Node.name == "site-n0")
            .with_for_update(of=Assignment)
        ).one()
        held.message = "a step changing it"
        step.flush()
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '5s'"))  # a wait fails the test
            assert ingest_heartbeats(s, beats).accepted == 2
    with session_scope() as s:
        rows = s.execute(
            select(Node.name, Node.last_seq, Assignment.metrics).join(Assignment)
        ).all()
    windows = {name: metrics.get("reported_at") for name, _, metrics in rows}
    assert windows == {"site-n0": None, "site-n1": now.isoformat()}
    assert {name: seq for name, seq, _ in rows} == {"site-n0": 1, "site-n1": 1}
    with session_scope() as s:  # the next heartbeat, the row free again: stored
        assert ingest_heartbeats(s, [beat("site-n0", 2, now, sha, "1.0.0")]).accepted == 1
        metrics = s.scalars(
            select(Assignment.metrics).join(Node).where(Node.name == "site-n0")
        ).one()
    assert metrics["reported_at"] == now.isoformat()
