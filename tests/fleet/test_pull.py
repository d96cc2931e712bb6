"""Pull mode's controller side without a cluster: the manifest rules, enrolment and the
cluster credential, the long poll's resume token, the report, and the pull driver's
revisions (controller/fleet/pull.py, controller/kube/pull.py). The end-to-end path with a
real API server and the real cluster agent is tests/kube/test_pull_mode.py."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.base import utcnow
from controller.db.models import Cluster, Event, PullCluster, PullDesired
from controller.db.session import session_scope
from controller.fleet import repository as repo
from controller.fleet.pull import hash_credential
from controller.fleet.service import cluster_driver
from controller.kube.driver import DriverError, WorkloadSpec
from controller.kube.pull import PullDriver
from controller.settings import Settings
from tests.conftest import bearer
from tests.rollouts.helpers import apply

NO_TOKEN = {"Authorization": ""}


def pull_doc(name: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgefleet.io/v1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {"driver": "kubernetes", "mode": "pull", **spec},
    }


def issue_join_token(client: TestClient, name: str = "shop", **body: Any) -> str:
    """A join token for the cluster, issued by the admin."""
    resp = client.post(f"/v1/clusters/{name}/pull/join-token", json=body)
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def enroll(client: TestClient, name: str, token: str) -> Any:
    return client.post(
        f"/v1/clusters/{name}/pull/enroll", json={"join_token": token}, headers=NO_TOKEN
    )


def enrol(client: TestClient, name: str = "shop") -> str:
    """The cluster agent enrolled with a new join token; its credential."""
    resp = enroll(client, name, issue_join_token(client, name))
    assert resp.status_code == 200, resp.text
    credential: str = resp.json()["credential"]
    return credential


def as_cluster(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


REPORT = {
    "applied_revision": None,
    "nodes": [
        {"name": "n1", "labels": {"tier": "retail"}, "ready": True, "architecture": "arm64"},
        {"name": "n2", "labels": {"tier": "retail"}, "ready": True},
    ],
    "workloads": [],
}


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"server": "https://10.0.0.1:6443"}, "no server or credentials"),
        ({"credentials": {"token": "t"}}, "no server or credentials"),
    ],
)
def test_a_pull_cluster_names_no_server_or_credentials(
    client: TestClient, spec: dict[str, Any], error: str
) -> None:
    resp = apply(client, pull_doc(**spec))
    assert resp.status_code == 422
    assert error in resp.text


def test_pull_mode_is_for_kubernetes_clusters_only(client: TestClient) -> None:
    doc = pull_doc()
    doc["spec"] = {"driver": "simulated", "mode": "pull", "simulated": {"count": 1}}
    resp = apply(client, doc)
    assert resp.status_code == 422
    assert "driver 'kubernetes' only" in resp.text


def test_enrol_report_and_poll(client: TestClient, settings: Settings) -> None:
    assert apply(client, pull_doc()).status_code == 200
    got = client.get("/v1/clusters/shop").json()
    assert (got["mode"], got["server"], got["has_credentials"]) == ("pull", None, False)
    assert got["status"] == "Unreachable"  # no agent yet, and the message says so
    assert "not enrolled yet" in got["message"]

    # Enrolment: the cluster's join token, once.
    assert enroll(client, "shop", "no").status_code == 401
    token = issue_join_token(client)
    resp = enroll(client, "shop", token)
    assert resp.status_code == 200, resp.text
    credential = resp.json()["credential"]
    # Enrolled: even a new join token enrols no second agent until an admin resets it.
    assert enroll(client, "shop", issue_join_token(client)).status_code == 409

    # The report syncs the nodes at once.
    resp = client.post(
        "/v1/clusters/shop/pull/observed", json=REPORT, headers=as_cluster(credential)
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"revision": 0}
    nodes = client.get("/v1/nodes", params={"cluster": "shop"}).json()["items"]
    assert {n["name"] for n in nodes} == {"n1", "n2"}
    assert client.get("/v1/clusters/shop").json()["status"] == "Ready"

    # The first poll (no revision yet) answers at once with the whole state.
    desired = client.get("/v1/clusters/shop/pull/desired", headers=as_cluster(credential)).json()
    assert desired["changed"] is True
    assert desired["revision"] == 0
    assert desired["daemonsets"] == desired["services"] == []
    assert desired["secret"]["metadata"]["name"] == "edgefleet-artifact-token"
    # With the revision it has, it waits (here: not at all) and says unchanged.
    same = client.get(
        "/v1/clusters/shop/pull/desired",
        params={"since": 0, "wait": 0},
        headers=as_cluster(credential),
    ).json()
    assert same["changed"] is False
    assert same["daemonsets"] == []

    # The pull driver publishes a new revision; the poll brings the push driver's objects.
    spec = WorkloadSpec("detector", "1.0.0", "ab" * 32, "onnx", "http://c/a", "r1", {})
    with session_scope() as s:
        cluster = repo.get_cluster(s, "shop")
        assert cluster is not None
        cluster_driver(cluster, settings).apply("detector", {"n1": spec, "n2": None})
    new = client.get(
        "/v1/clusters/shop/pull/desired",
        params={"since": 0, "wait": 5},
        headers=as_cluster(credential),
    ).json()
    assert (new["changed"], new["revision"]) == (True, 1)
    (ds,) = new["daemonsets"]
    assert ds["kind"] == "DaemonSet"
    # The nodes labelled for 1.0.0, or handing over from it (make before break).
    affinity = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"] for t in terms] == [
        [{"key": "model.edgefleet.io/detector", "operator": "In", "values": ["1.0.0"]}],
        [{"key": "previous.model.edgefleet.io/detector", "operator": "In", "values": ["1.0.0"]}],
    ]
    assert new["node_labels"] == {"n1": {"model.edgefleet.io/detector": "1.0.0"}}
    # The applications' endpoint on each node, as in push mode.
    (svc,) = new["services"]
    assert (svc["kind"], svc["metadata"]["name"]) == ("Service", "ef-detector")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert svc["spec"]["selector"] == {
        "app.kubernetes.io/name": "edgefleet-inference",
        "edgefleet.io/model": "detector",
    }

    # Reset by an admin: the credential stops working, and the agent may enrol again.
    assert client.post("/v1/clusters/shop/pull/reset").status_code == 204
    refused = client.get("/v1/clusters/shop/pull/desired", headers=as_cluster(credential))
    assert refused.status_code == 401
    assert enroll(client, "shop", token).status_code == 401  # used up
    enrol(client)  # with a new one


def test_a_cluster_credential_speaks_for_its_own_cluster_only(client: TestClient) -> None:
    assert apply(client, pull_doc("shop"), pull_doc("depot")).status_code == 200
    shop = enrol(client, "shop")
    resp = client.post("/v1/clusters/depot/pull/observed", json=REPORT, headers=as_cluster(shop))
    assert resp.status_code == 403
    assert (
        client.get("/v1/clusters/depot/pull/desired", headers=as_cluster(shop)).status_code == 403
    )
    # Nor is an API token a cluster credential.
    assert client.get("/v1/clusters/shop/pull/desired").status_code == 401


def test_reports_are_bounded(client: TestClient) -> None:
    assert apply(client, pull_doc()).status_code == 200
    credential = enrol(client)
    dupes = {**REPORT, "nodes": [REPORT["nodes"][0], REPORT["nodes"][0]]}  # type: ignore[index]
    resp = client.post(
        "/v1/clusters/shop/pull/observed", json=dupes, headers=as_cluster(credential)
    )
    assert resp.status_code == 422
    odd = {**REPORT, "workloads": [{"model": "m", "node": "n1", "phase": "Exploded"}]}
    resp = client.post("/v1/clusters/shop/pull/observed", json=odd, headers=as_cluster(credential))
    assert resp.status_code == 422
    huge = {**REPORT, "nodes": [{"name": f"n{i}", "ready": True} for i in range(5001)]}
    resp = client.post("/v1/clusters/shop/pull/observed", json=huge, headers=as_cluster(credential))
    assert resp.status_code in (413, 422)


def test_the_revision_moves_only_when_the_desired_state_changes(
    client: TestClient, settings: Settings
) -> None:
    assert apply(client, pull_doc()).status_code == 200
    spec = WorkloadSpec("detector", "1.0.0", "ab" * 32, "onnx", "http://c/a", "r1", {})
    with session_scope() as s:
        driver = PullDriver(s, "shop", silent_after_s=60)
        driver.apply("detector", {"n1": None})  # nothing to take away: nothing written
        assert s.scalars(select(PullDesired)).all() == []
        driver.apply("detector", {"n1": spec, "n2": spec})
        driver.apply("detector", {"n1": spec, "n2": spec})  # the reconciler's next step
        state = s.scalars(select(PullCluster)).one()
        assert state.revision == 1
        driver.apply("detector", {"n2": None})
        assert state.revision == 2
        rows = {r.node: (r.workload, r.revision) for r in s.scalars(select(PullDesired))}
        assert rows == {"n1": (spec.as_dict(), 1), "n2": (None, 2)}


def test_a_silent_cluster_agent_is_no_evidence(client: TestClient) -> None:
    assert apply(client, pull_doc()).status_code == 200
    credential = enrol(client)
    report = {
        **REPORT,
        "workloads": [
            {"model": "detector", "node": "n1", "phase": "Ready", "version": "1", "restarts": 2}
        ],
    }
    client.post("/v1/clusters/shop/pull/observed", json=report, headers=as_cluster(credential))
    with session_scope() as s:
        seen = PullDriver(s, "shop", silent_after_s=60).observe("detector", ["n1", "n2"])
        assert seen["n1"].phase == "Ready"
        assert seen["n1"].restarts == 2
        assert seen["n2"].phase == "Absent"
        later = PullDriver(s, "shop", silent_after_s=60, now=utcnow() + timedelta(minutes=5))
        with pytest.raises(DriverError, match="has not reported for") as info:
            later.observe("detector", ["n1"])
        assert info.value.transient
        with pytest.raises(DriverError):
            later.list_nodes()


def test_a_node_in_a_handover_reports_the_version_it_moves_to(client: TestClient) -> None:
    """The agent reports both pods of a node in a handover; the rollout engine hears of
    the one the node should run (as from the push driver), whatever their order."""
    assert apply(client, pull_doc()).status_code == 200
    credential = enrol(client)
    spec = WorkloadSpec("detector", "2.0.0", "ab" * 32, "onnx", "http://c/a", "r1", {})
    with session_scope() as s:
        PullDriver(s, "shop", silent_after_s=60).apply("detector", {"n1": spec, "n2": spec})
    old = {"model": "detector", "node": "n1", "phase": "Ready", "version": "1.0.0"}
    new = {"model": "detector", "node": "n1", "phase": "Pending", "version": "2.0.0"}
    other = {"model": "detector", "node": "n2", "phase": "Ready", "version": "1.0.0"}
    for pods in ([old, new, other], [new, old, other]):
        resp = client.post(
            "/v1/clusters/shop/pull/observed",
            json={**REPORT, "workloads": pods},
            headers=as_cluster(credential),
        )
        assert resp.status_code == 200, resp.text
        with session_scope() as s:
            seen = PullDriver(s, "shop", silent_after_s=60).observe("detector", ["n1", "n2"])
        assert (seen["n1"].phase, seen["n1"].version) == ("Pending", "2.0.0")
        # Not moved yet (break before make, or its new pod not made): what runs there.
        assert (seen["n2"].phase, seen["n2"].version) == ("Ready", "1.0.0")


def test_a_join_token_enrols_its_own_cluster_once_before_it_expires(
    client: TestClient, session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pushed = {
        "apiVersion": "edgefleet.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "pushed"},
        "spec": {"driver": "simulated", "simulated": {"count": 1}},
    }
    assert apply(client, pull_doc("shop"), pull_doc("depot"), pushed).status_code == 200
    shop = issue_join_token(client, "shop")
    depot = issue_join_token(client, "depot", expires="1h")
    assert shop.startswith("efj_")
    assert shop != depot

    # Another cluster's token: refused.
    wrong = enroll(client, "depot", shop)
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == "invalid, used or expired join token for cluster 'depot'"
    assert enroll(client, "shop", shop).status_code == 200
    # Used up: no second enrolment with it, even after a reset.
    assert client.post("/v1/clusters/shop/pull/reset").status_code == 204
    assert enroll(client, "shop", shop).status_code == 401

    # Expired: an hour later it no longer works.
    state = session.scalars(select(PullCluster).join(Cluster).where(Cluster.name == "depot")).one()
    assert state.join_token_expires_at is not None
    assert timedelta(minutes=59) < state.join_token_expires_at - utcnow() <= timedelta(hours=1)
    state.join_token_expires_at = utcnow() - timedelta(seconds=1)
    session.flush()
    assert enroll(client, "depot", depot).status_code == 401

    # An unknown cluster or one in push mode answers the same, so names cannot be probed.
    for name in ("nowhere", "pushed"):
        resp = enroll(client, name, depot)
        assert resp.status_code == 401
        assert "invalid, used or expired join token" in resp.json()["detail"]

    # The event log says which refusal it was; no event, log line or answer but the
    # first holds a token, and the database keeps their sha256 only.
    reasons = [
        e.message
        for e in session.scalars(
            select(Event).where(Event.reason == "EnrolmentRefused").order_by(Event.id)
        )
    ]
    assert reasons == [
        "cluster agent enrolment refused: not this cluster's join token",
        "cluster agent enrolment refused: no unused join token (an admin issues one: "
        "edgefleet clusters join-token NAME)",
        "cluster agent enrolment refused: the join token has expired",
    ]
    events = session.scalars(select(Event)).all()
    stored = session.scalars(select(PullCluster)).all()
    shown = client.get("/v1/clusters/depot").text + client.get("/v1/events").text
    for token in (shop, depot):
        assert token not in caplog.text
        assert token not in shown
        assert not [e for e in events if token in f"{e.message} {e.data}"]
    assert {s.join_token_hash for s in stored} == {hash_credential(depot), None}


def test_join_tokens_are_for_admins_with_a_bounded_lifetime(client: TestClient) -> None:
    assert apply(client, pull_doc()).status_code == 200
    resp = client.post("/v1/clusters/shop/pull/join-token", json={}, headers=bearer("operator"))
    assert resp.status_code == 403
    for expires in ("soon", "30s", "8d"):
        resp = client.post("/v1/clusters/shop/pull/join-token", json={"expires": expires})
        assert resp.status_code == 422, expires
        assert resp.json()["detail"][0]["loc"] == ["body", "expires"]
    assert client.post("/v1/clusters/nowhere/pull/join-token", json={}).status_code == 404
