"""Enrolment and the heartbeat endpoint, through the API on real Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.api.app import create_app
from controller.db.models import Assignment, AssignmentState, Cluster, Event, ModelVersion, Node
from controller.db.session import session_scope
from controller.fleet import repository as fleet_repo
from controller.settings import Settings
from node_agent.contract import Heartbeat, InferenceMetrics, NodeStatus, WorkloadReport
from tests.conftest import bearer
from tests.rollouts import helpers
from tests.rollouts.helpers import apply, cluster_doc, drive, push_versions, rollout_doc


def enroll(client: TestClient, node: str, token: str, cluster: str = "site") -> Any:
    return client.post(
        "/v1/agents/enroll", json={"cluster": cluster, "node": node, "join_token": token}
    )


def credential_of(client: TestClient, node: str, token: str, cluster: str = "site") -> str:
    resp = enroll(client, node, token, cluster)
    assert resp.status_code == 200, resp.text
    credential: str = resp.json()["credential"]
    return credential


def beat(node: str, seq: int, *, cluster: str = "site", **extra: Any) -> dict[str, Any]:
    return Heartbeat(
        cluster=cluster, node=node, seq=seq, sent_at=datetime.now(UTC), **extra
    ).model_dump(mode="json")


def send(client: TestClient, credential: str, body: Any) -> Any:
    return client.post(
        "/v1/agents/heartbeat", json=body, headers={"Authorization": f"Bearer {credential}"}
    )


def node_row(name: str) -> Node:
    with session_scope() as s:
        node = s.scalar(select(Node).where(Node.name == name))
        assert node is not None
        s.expunge(node)
        return node


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("edgefleet_heartbeats_total", {"result": result}) or 0.0


# --- enrolment --------------------------------------------------------------------------


def test_enroll_issues_a_credential_stored_only_as_its_hash(
    site: TestClient, join_token: str, settings: Settings
) -> None:
    resp = enroll(site, "site-n0", join_token)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["node"] == "site-n0"
    assert body["cluster"] == "site"
    assert body["heartbeat_interval_s"] == settings.agent_heartbeat_interval_s
    assert body["last_seq"] == 0
    credential = body["credential"]
    assert len(credential) >= 43  # 32 random bytes, url-safe base64
    node = node_row("site-n0")
    assert node.credential_hash == hashlib.sha256(credential.encode()).hexdigest()
    with session_scope() as s:
        reasons = s.scalars(
            select(Event.reason).where(
                Event.object_kind == "Node", Event.object_name == "site/site-n0"
            )
        ).all()
    assert reasons == ["AgentEnrolled"]


def test_enroll_with_a_bad_token_is_401(site: TestClient, join_token: str) -> None:
    resp = enroll(site, "site-n0", join_token + "x")
    assert resp.status_code == 401
    assert resp.json() == {"error": "unauthorized", "detail": "invalid join token"}
    assert node_row("site-n0").credential_hash is None


def test_enroll_of_an_unknown_node_is_404_naming_it(site: TestClient, join_token: str) -> None:
    resp = enroll(site, "ghost", join_token)
    assert resp.status_code == 404
    assert "site/ghost" in resp.json()["detail"]
    assert enroll(site, "site-n0", join_token, cluster="elsewhere").status_code == 404


def test_enroll_is_disabled_without_a_join_token(site: TestClient, settings: Settings) -> None:
    assert settings.agent_join_token is None
    resp = enroll(site, "site-n0", "anything")
    assert resp.status_code == 503
    assert "EDGEFLEET_AGENT_JOIN_TOKEN" in resp.json()["detail"]


def test_a_second_enrolment_is_refused_until_an_admin_resets_the_node(
    site: TestClient, join_token: str
) -> None:
    """Every agent holds the join token: it must not let one node take over another's
    identity. The takeover is refused, the real node keeps reporting, and only an admin's
    reset lets the node enrol again (with a new credential; the old one stops)."""
    old = credential_of(site, "site-n0", join_token)
    assert send(site, old, beat("site-n0", 1)).status_code == 200

    takeover = enroll(site, "site-n0", join_token)
    assert takeover.status_code == 409, takeover.text
    assert "edgefleet nodes reset site/site-n0" in takeover.json()["detail"]
    assert "credential" not in takeover.json()
    assert send(site, old, beat("site-n0", 2)).status_code == 200
    with session_scope() as s:
        reasons = s.scalars(
            select(Event.reason).where(Event.object_name == "site/site-n0").order_by(Event.id)
        ).all()
    assert reasons == ["AgentEnrolled", "EnrolmentRefused"]

    # Only an admin may reset a node.
    path = "/v1/clusters/site/nodes/site-n0/reset"
    assert site.post(path, headers=bearer("operator")).status_code == 403
    assert site.post(path, headers={"Authorization": ""}).status_code == 401
    reset = site.post(path)
    assert reset.status_code == 200, reset.text
    resp = send(site, old, beat("site-n0", 3))
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"

    again = enroll(site, "site-n0", join_token)
    assert again.status_code == 200, again.text
    new = again.json()["credential"]
    assert new != old
    # Enrolling tells the agent where the node's sequence stands.
    assert again.json()["last_seq"] == 2
    got = send(site, new, beat("site-n0", 3))
    assert got.json() == {"accepted": 1, "duplicates": 0, "last_seq": 3, "benchmarks_pending": 0}
    assert send(site, old, beat("site-n0", 4)).status_code == 401
    with session_scope() as s:
        reset_event = s.scalars(
            select(Event).where(Event.object_name == "site/site-n0", Event.reason == "NodeReset")
        ).one()
        assert reset_event.actor == "token:test-admin"


def test_resetting_an_unknown_node_is_404(site: TestClient) -> None:
    resp = site.post("/v1/clusters/site/nodes/nowhere/reset")
    assert resp.status_code == 404
    assert "site/nowhere" in resp.json()["detail"]


# --- heartbeats -------------------------------------------------------------------------


def test_heartbeat_updates_the_node(site: TestClient, join_token: str) -> None:
    credential = credential_of(site, "site-n1", join_token)
    before = counted("accepted")
    status = NodeStatus(cpu_percent=12.5, memory_used_bytes=1, memory_total_bytes=2)
    resp = send(site, credential, beat("site-n1", 7, status=status))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"accepted": 1, "duplicates": 0, "last_seq": 7, "benchmarks_pending": 0}
    node = node_row("site-n1")
    assert (node.last_seq, node.health) == (7, "Ready")
    assert node.last_heartbeat_at is not None
    assert counted("accepted") == before + 1


def test_heartbeat_stores_the_cpu_model_and_answers_pending_benchmarks(
    site: TestClient, join_token: str
) -> None:
    """The node class benchmarks are kept per includes the CPU model the agent reports;
    the answer tells the agent how many benchmark jobs wait for its node."""
    credential = credential_of(site, "site-n1", join_token)
    with session_scope() as s:
        node = s.scalar(select(Node).where(Node.name == "site-n1"))
        assert node is not None
        node.benchmarks_pending = 2
    status = NodeStatus(cpu_model="Cortex-A76")
    resp = send(site, credential, beat("site-n1", 1, status=status))
    assert resp.json() == {"accepted": 1, "duplicates": 0, "last_seq": 1, "benchmarks_pending": 2}
    assert node_row("site-n1").cpu_model == "Cortex-A76"
    # A heartbeat without it keeps the one reported before.
    assert send(site, credential, beat("site-n1", 2)).json()["benchmarks_pending"] == 2
    assert node_row("site-n1").cpu_model == "Cortex-A76"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer nope"},
    ],
)
def test_heartbeat_without_a_valid_credential_is_401(
    site: TestClient, headers: dict[str, str]
) -> None:
    before = counted("unauthorized")
    resp = site.post("/v1/agents/heartbeat", json=beat("site-n0", 1), headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"] == "unauthorized"
    assert node_row("site-n0").last_seq == 0
    if "nope" in headers.get("Authorization", ""):
        assert counted("unauthorized") == before + 1


def test_replays_are_counted_as_duplicates_and_not_applied(
    site: TestClient, join_token: str
) -> None:
    credential = credential_of(site, "site-n0", join_token)
    resp = send(site, credential, [beat("site-n0", s) for s in (1, 2, 3)])
    assert resp.json() == {"accepted": 3, "duplicates": 0, "last_seq": 3, "benchmarks_pending": 0}
    seen_at = node_row("site-n0").last_heartbeat_at
    duplicates = counted("duplicate")

    resp = send(site, credential, [beat("site-n0", s) for s in (1, 2, 3)])
    assert resp.json() == {"accepted": 0, "duplicates": 3, "last_seq": 3, "benchmarks_pending": 0}
    assert node_row("site-n0").last_heartbeat_at == seen_at  # nothing re-applied
    assert counted("duplicate") == duplicates + 3

    resp = send(site, credential, [beat("site-n0", s) for s in (2, 3, 4)])
    assert resp.json() == {"accepted": 1, "duplicates": 2, "last_seq": 4, "benchmarks_pending": 0}
    # A late, older heartbeat never moves the node back.
    assert send(site, credential, beat("site-n0", 1)).json()["last_seq"] == 4
    assert node_row("site-n0").last_seq == 4


def test_impersonation_is_refused_and_nothing_is_stored(site: TestClient, join_token: str) -> None:
    credential = credential_of(site, "site-n0", join_token)
    forbidden = counted("forbidden")
    body = [beat("site-n0", 1), beat("site-n1", 1)]
    resp = send(site, credential, body)
    assert resp.status_code == 403
    assert resp.json()["error"] == "forbidden"
    assert "site/site-n1" in resp.json()["detail"]
    assert "site/site-n0" in resp.json()["detail"]  # whose credential it was
    assert node_row("site-n0").last_seq == 0  # not even the node's own heartbeat
    assert node_row("site-n1").last_seq == 0
    assert node_row("site-n1").last_heartbeat_at is None
    assert counted("forbidden") == forbidden + 2
    # Another cluster's node of the same name is another node.
    resp = send(site, credential, beat("site-n0", 1, cluster="other"))
    assert resp.status_code == 403


def test_a_batch_of_500_in_one_call(site: TestClient, join_token: str, settings: Settings) -> None:
    credential = credential_of(site, "site-n2", join_token)
    body = [beat("site-n2", s) for s in range(1, 501)]
    resp = send(site, credential, body)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "accepted": 500,
        "duplicates": 0,
        "last_seq": 500,
        "benchmarks_pending": 0,
    }
    too_many = [beat("site-n2", s) for s in range(501, 502 + settings.agent_max_batch)]
    resp = send(site, credential, too_many)
    assert resp.status_code == 413
    assert "EDGEFLEET_AGENT_MAX_BATCH" in resp.json()["detail"]
    assert node_row("site-n2").last_seq == 500


def test_an_invalid_heartbeat_is_422_with_its_path(site: TestClient, join_token: str) -> None:
    credential = credential_of(site, "site-n0", join_token)
    resp = send(site, credential, [beat("site-n0", 1), {**beat("site-n0", 2), "seq": 0}])
    assert resp.status_code == 422
    assert any(e["loc"][-1] == "seq" for e in resp.json()["detail"])
    assert node_row("site-n0").last_seq == 0


# --- concurrent heartbeats share one transaction --------------------------------------------


def post_together(app: FastAPI, requests: Sequence[tuple[str, Any]]) -> list[httpx.Response]:
    """POST every (credential, body) at once: concurrent requests, as a fleet sends."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://controller") as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/agents/heartbeat",
                        json=body,
                        headers={"Authorization": f"Bearer {credential}"},
                    )
                    for credential, body in requests
                )
            )

    return asyncio.run(run())


@pytest.fixture
def together(site: TestClient, join_token: str, settings: Settings) -> Iterator[FastAPI]:
    """An app whose heartbeat requests wait long enough for each other that requests
    sent at once surely share a transaction."""
    app = create_app(settings.model_copy(update={"agent_coalesce_window_ms": 300.0}))
    yield app
    app.state.heartbeats.close()


def test_concurrent_heartbeats_share_a_transaction_with_answers_of_their_own(
    site: TestClient, together: FastAPI, join_token: str
) -> None:
    creds = {n: credential_of(site, n, join_token) for n in ("site-n0", "site-n1", "site-n2")}
    accepted, forbidden = counted("accepted"), counted("forbidden")
    intake = together.state.heartbeats
    before = intake.coalescer.batches
    got = post_together(
        together,
        [
            (creds["site-n0"], [beat("site-n0", 1)]),
            (creds["site-n1"], beat("site-n1", 5)),
            (creds["site-n2"], [beat("site-n1", 6), beat("site-n2", 1)]),  # not its own
            ("not-a-credential", [beat("site-n2", 1)]),
            (creds["site-n2"], [{**beat("site-n2", 2), "seq": 0}]),  # invalid
            (creds["site-n0"], [beat("site-n0", 1)]),  # a retry racing the first
        ],
    )
    assert [r.status_code for r in got] == [200, 200, 403, 401, 422, 200]
    assert got[1].json() == {"accepted": 1, "duplicates": 0, "last_seq": 5, "benchmarks_pending": 0}
    assert "site/site-n1" in got[2].json()["detail"]
    assert got[3].headers["www-authenticate"] == "Bearer"
    assert any(e["loc"][-1] == "seq" for e in got[4].json()["detail"])
    # Whichever of the two came first was stored; the other is a duplicate.
    assert sorted([got[0].json(), got[5].json()], key=lambda a: a["accepted"]) == [
        {"accepted": 0, "duplicates": 1, "last_seq": 1, "benchmarks_pending": 0},
        {"accepted": 1, "duplicates": 0, "last_seq": 1, "benchmarks_pending": 0},
    ]
    # Five requests reached the ingest (the invalid one did not): one transaction.
    assert intake.coalescer.batches == before + 1
    assert (node_row("site-n0").last_seq, node_row("site-n1").last_seq) == (1, 5)
    assert node_row("site-n2").last_seq == 0  # the refused request stored nothing
    assert node_row("site-n2").last_heartbeat_at is None
    assert counted("accepted") == accepted + 2
    assert counted("forbidden") == forbidden + 2


def test_a_request_that_breaks_the_shared_transaction_fails_alone(
    site: TestClient, together: FastAPI, join_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses the batch because of one request: the batch is rolled back
    (nothing half-written), every request is tried again in a transaction of its own,
    and only the culprit fails."""
    creds = {n: credential_of(site, n, join_token) for n in ("site-n0", "site-n1", "site-n2")}
    culprit = node_row("site-n1").id
    write = fleet_repo.write_heartbeats

    def refusing(session: Session, *, nodes: Any, **kw: Any) -> None:
        write(session, nodes=nodes, **kw)  # written, then the transaction fails
        if culprit in nodes:
            raise IntegrityError("UPDATE nodes", {}, Exception("refused by the database"))

    monkeypatch.setattr(fleet_repo, "write_heartbeats", refusing)
    intake = together.state.heartbeats
    before = intake.coalescer.batches
    got = post_together(
        together,
        [
            (creds["site-n0"], [beat("site-n0", 1)]),
            (creds["site-n1"], [beat("site-n1", 1)]),
            (creds["site-n2"], [beat("site-n2", 1)]),
        ],
    )
    assert [r.status_code for r in got] == [200, 500, 200]
    assert got[1].json()["error"] == "internal_error"
    assert intake.coalescer.batches == before + 4  # the batch, then each alone
    assert [node_row(n).last_seq for n in ("site-n0", "site-n1", "site-n2")] == [1, 0, 1]
    assert node_row("site-n1").last_heartbeat_at is None


def test_a_heartbeat_picked_as_a_deadlock_victim_is_run_again(
    committed_client: TestClient, sim_fleet: None, join_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real deadlock: another transaction holds the cluster row and waits for the node
    row the heartbeat locked, while the heartbeat waits for the cluster row. Postgres
    aborts the heartbeat (the other's deadlock_timeout is longer, so it is always the
    heartbeat); the intake runs it again once the other has gone on, and answers 200."""
    site = committed_client
    assert apply(site, cluster_doc("site", 1)).status_code == 200
    credential = credential_of(site, "site-n0", join_token)
    node_id = node_row("site-n0").id
    write = fleet_repo.write_heartbeats
    calls: list[int] = []
    locked = threading.Event()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with session_scope() as s:
                s.execute(text("SET LOCAL deadlock_timeout = '60s'"))
                s.execute(select(Cluster).where(Cluster.name == "site").with_for_update())
                locked.set()
                s.execute(update(Node).where(Node.id == node_id).values(health=Node.health))
        except BaseException as exc:
            errors.append(exc)
            locked.set()

    def deadlocking(session: Session, **kw: Any) -> None:
        calls.append(1)
        write(session, **kw)
        if len(calls) == 1:
            threading.Thread(target=other, daemon=True).start()
            assert locked.wait(30)
            session.execute(select(Cluster).where(Cluster.name == "site").with_for_update())

    monkeypatch.setattr(fleet_repo, "write_heartbeats", deadlocking)
    conflicts = REGISTRY.get_sample_value("edgefleet_heartbeat_conflicts_total") or 0.0
    resp = send(site, credential, [beat("site-n0", 1)])
    assert resp.status_code == 200, resp.text
    assert resp.json()["accepted"] == 1
    assert len(calls) == 2
    assert not errors, errors
    assert REGISTRY.get_sample_value("edgefleet_heartbeat_conflicts_total") == conflicts + 1
    assert node_row("site-n0").last_seq == 1


# --- heartbeats feed the gates ------------------------------------------------------------


class HttpAgents:
    """Every node's agent, reporting through POST /v1/agents/heartbeat with its own
    credential, in place of tests.rollouts.helpers.report (which ingests directly)."""

    def __init__(self, client: TestClient, token: str, nodes: Sequence[str]) -> None:
        self.client = client
        self.credentials = {n: credential_of(client, n, token) for n in nodes}
        self.seq = itertools.count(1)
        self.accepted = 0

    def report(self, p95_ms: float, errors: int, samples: int) -> int:
        with session_scope() as s:
            rows = s.execute(
                select(Node.name, Cluster.name, ModelVersion)
                .join(Cluster, Cluster.id == Node.cluster_id)
                .join(Assignment, Assignment.node_id == Node.id)
                .join(ModelVersion, ModelVersion.id == Assignment.observed_version_id)
                .where(Assignment.state.in_([AssignmentState.RUNNING, AssignmentState.HEALTHY]))
            ).all()
            running = [(node, cluster, v.version, v.sha256) for node, cluster, v in rows]
        for node, cluster, version, sha in running:
            metrics = InferenceMetrics(
                window_s=10, samples=samples, errors=errors, p50_ms=p95_ms / 3, p95_ms=p95_ms
            )
            workload = WorkloadReport(
                model="detector", version=version, sha256=sha, state="Ready", metrics=metrics
            )
            resp = send(
                self.client,
                self.credentials[node],
                beat(node, next(self.seq), cluster=cluster, workloads=[workload]),
            )
            assert resp.status_code == 200, resp.text
            self.accepted += resp.json()["accepted"]
        return len(running)


@pytest.fixture
def http_agents(site: TestClient, join_token: str) -> HttpAgents:
    return HttpAgents(site, join_token, ["site-n0", "site-n1", "site-n2"])


def _gate_snapshots(client: TestClient, rollout: str) -> list[dict[str, Any]]:
    events = client.get(f"/v1/rollouts/{rollout}/events", params={"limit": 1000}).json()
    return [e["data"]["gate"] for e in events if e["reason"] == "GatePassed"]


def test_gates_pass_on_numbers_sent_over_http(
    site: TestClient, http_agents: HttpAgents, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_versions(site, "1.0.0")
    monkeypatch.setattr(
        helpers, "report", lambda *_a, **_k: http_agents.report(p95_ms=17.25, errors=0, samples=40)
    )
    assert apply(site, rollout_doc("r1", "1.0.0")).status_code == 200
    phases = drive("r1", settings)
    assert phases[-1] == "Succeeded"
    assert http_agents.accepted > 0
    snapshots = _gate_snapshots(site, "r1")
    assert len(snapshots) == 3
    assert {s["max_p95_ms"] for s in snapshots} == {17.25}  # the numbers we sent
    with session_scope() as s:
        metrics = s.scalars(select(Assignment.metrics)).all()
    assert {(m["samples"], m["p95_ms"], m["on_desired"]) for m in metrics} == {(40, 17.25, True)}


def test_gates_fail_on_bad_numbers_sent_over_http(
    site: TestClient, http_agents: HttpAgents, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_versions(site, "1.0.0")
    monkeypatch.setattr(
        helpers, "report", lambda *_a, **_k: http_agents.report(p95_ms=95.0, errors=0, samples=40)
    )
    assert apply(site, rollout_doc("r2", "1.0.0")).status_code == 200
    phases = drive("r2", settings)
    assert phases[-1] in ("Failed", "RolledBack")
    events = site.get("/v1/rollouts/r2/events", params={"limit": 1000}).json()
    failed = next(e for e in events if e["reason"] == "GateFailed")
    assert "p95 95.0 ms > 40" in str(failed["data"])


def test_credentials_do_not_cross_clusters(site: TestClient, join_token: str) -> None:
    assert apply(site, cluster_doc("annex", 1)).status_code == 200
    site_cred = credential_of(site, "site-n0", join_token)
    annex_cred = credential_of(site, "annex-n0", join_token, cluster="annex")
    assert send(site, annex_cred, beat("annex-n0", 1, cluster="annex")).status_code == 200
    assert send(site, site_cred, beat("annex-n0", 2, cluster="annex")).status_code == 403
