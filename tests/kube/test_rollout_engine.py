"""Done-when of the Kubernetes driver: the rollout engine, pointed at two real API
servers, moves pods of a new version onto the selected nodes wave by wave, and a
rollback removes them with nothing left over."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select

from controller.db.models import Cluster
from controller.db.session import session_scope
from controller.rollouts import reconciler
from controller.rollouts import repository as rollout_repo
from controller.settings import Settings
from tests.kube.controlplane import ControlPlane, make_node
from tests.kube.kubelet import eventually, finalize_terminating_pods, start_pods
from tests.live import free_port
from tests.rollouts.helpers import apply, push_versions, report, rollout_doc, rollout_id


def cluster_manifest(name: str, cp: ControlPlane, namespace: str) -> dict[str, Any]:
    ca = Path(cp.ca_cert_path).read_text() if cp.ca_cert_path else None
    creds: dict[str, Any] = {"token": cp.token}
    if ca:
        creds["caData"] = ca
    else:
        creds["insecureSkipTLSVerify"] = True
    return {
        "apiVersion": "edgefleet.io/v1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {
            "driver": "kubernetes",
            "server": cp.server,
            "namespace": namespace,
            "credentials": creds,
        },
    }


class Site:
    def __init__(self, name: str, cp: ControlPlane, namespace: str) -> None:
        self.name, self.cp, self.ns = name, cp, namespace
        self.core: Any = k8s.CoreV1Api(cp.api_client())
        self.apps: Any = k8s.AppsV1Api(cp.api_client())
        self.nodes = [f"{name}-{uuid.uuid4().hex[:5]}-{i}" for i in range(3)]
        for node in self.nodes:
            make_node(self.core, node, labels={"tier": "retail", "site": name})

    def beat(self) -> None:
        start_pods(self.core, self.ns)

    def pods(self) -> dict[str, str]:
        return {
            p.spec.node_name: p.metadata.labels["edgefleet.io/version"]
            for p in self.core.list_namespaced_pod(self.ns).items
            if p.spec.node_name and p.metadata.deletion_timestamp is None
        }

    def daemonsets(self) -> list[str]:
        return [d.metadata.name for d in self.apps.list_namespaced_daemon_set(self.ns).items]

    def only(self, version: str) -> Callable[[], bool]:
        return lambda: self.pods() == dict.fromkeys(self.nodes, version)

    def settled_on(self, version: str) -> Callable[[], bool]:
        """Every node runs ``version`` and no other version's DaemonSet remains."""
        return lambda: self.only(version)() and len(self.daemonsets()) == 1

    def empty(self) -> bool:
        return not self.daemonsets() and not self.core.list_namespaced_pod(self.ns).items

    def finalize(self) -> None:
        finalize_terminating_pods(self.core, self.ns)

    def model_labels(self) -> list[str]:
        labels = {n.metadata.name: n.metadata.labels or {} for n in self.core.list_node().items}
        return [k for n in self.nodes for k in labels[n] if k.startswith("model.edgefleet.io/")]

    def cleanup(self) -> None:
        for node in self.nodes:
            self.core.delete_node(node)
        with contextlib.suppress(ApiException):  # never created if the site went unused
            self.core.delete_namespace(self.ns)


@pytest.fixture
def sites(control_plane: ControlPlane, second_control_plane: ControlPlane) -> Iterator[list[Site]]:
    ns = f"ef-{uuid.uuid4().hex[:8]}"
    made = [Site("alpha", control_plane, ns), Site("beta", second_control_plane, ns)]
    yield made
    for site in made:
        site.cleanup()


def story(client: TestClient, name: str) -> str:
    """The rollout's events, oldest first: why it ended where it did."""
    events = client.get(f"/v1/rollouts/{name}/events", params={"limit": 200}).json()
    return "\n".join(
        f"{e['reason']}: {e['message']} {e['data'].get('gate') or ''}" for e in reversed(events)
    )


def run(
    name: str, settings: Settings, sites: list[Site], *, metrics: Any = None, steps: int = 80
) -> list[str]:
    """The worker's loop, with kubelets and agents doing their part between steps."""
    rid = rollout_id(name)
    phases: list[str] = []
    for _ in range(steps):
        phase = reconciler.reconcile(rid, settings)
        assert phase is not None
        phases.append(phase)
        if phase not in ("Pending", "Progressing"):
            return phases
        for site in sites:
            site.beat()
        if metrics:
            report(metrics)
        else:
            report()
    raise AssertionError(f"{name} still {phases[-1]}")


def test_rollout_and_rollback_on_two_real_clusters(
    client: TestClient, settings: Settings, sites: list[Site]
) -> None:
    def pending(name: str) -> int:
        return int(client.get(f"/v1/rollouts/{name}").json()["status"]["pending"])

    resp = apply(client, *(cluster_manifest(s.name, s.cp, s.ns) for s in sites))
    assert resp.status_code == 200, resp.text
    nodes = client.get("/v1/nodes", params={"limit": 1000}).json()["items"]
    ours = {n["name"] for n in nodes}
    assert all(set(s.nodes) <= ours for s in sites)
    listed = str(client.get("/v1/clusters").json())
    assert all(s.cp.token not in listed for s in sites)  # never returned
    assert "'has_credentials': True" in listed
    push_versions(client, "1.0.0", "2.0.0")

    # Wave by wave onto six nodes of two clusters.
    selector = {
        "matchExpressions": [{"key": "site", "operator": "In", "values": ["alpha", "beta"]}]
    }
    assert apply(client, rollout_doc("v1", "1.0.0", selector=selector)).status_code == 200
    seen_waves: list[int] = []
    rid = rollout_id("v1")
    for _ in range(80):
        phase = reconciler.reconcile(rid, settings)
        running = sum(len(s.pods()) for s in sites)
        if not seen_waves or running != seen_waves[-1]:
            seen_waves.append(running)
        if phase == "Succeeded":
            break
        for site in sites:
            site.beat()
        report()
    assert phase == "Succeeded", story(client, "v1")
    # The canary alone first (counts of 0 are the DaemonSet controller not done yet).
    assert next(n for n in seen_waves if n) == 1
    assert seen_waves[-1] == 6
    for site in sites:
        assert site.only("1.0.0")()

    # Undo: the nodes had nothing before v1, so nothing is left, on either cluster.
    assert client.post("/v1/rollouts/v1/undo").status_code == 202

    def undo_step() -> None:
        for site in sites:
            site.finalize()
        assert reconciler.reconcile(rid, settings) == "RolledBack"

    # Over once no node shows a workload any more (they ran none before v1).
    eventually(lambda: pending("v1") == 0, what="v1's nodes seen empty", beat=undo_step)
    for site in sites:
        eventually(site.empty, what=f"{site.name}: no workloads at all", beat=site.finalize)
        assert not site.model_labels()

    # Retry brings 1.0.0 back everywhere.
    assert client.post("/v1/rollouts/v1/retry").status_code == 202
    assert run("v1", settings, sites)[-1] == "Succeeded", story(client, "v1")
    for site in sites:
        eventually(site.only("1.0.0"), what="v1 back", beat=site.beat)

    # A failing version: the canary gets 2.0.0, the gate fails, it goes back to 1.0.0 and
    # the 2.0.0 DaemonSets are gone from both clusters.
    assert apply(client, rollout_doc("v2", "2.0.0", selector=selector)).status_code == 200
    phases = run("v2", settings, sites, metrics=lambda node: (500.0, 0))
    assert phases[-1] == "RolledBack"
    # The canary was told to go back, and is not back before 1.0.0 is Ready on it: the
    # rollback is not over, and the rollout says so.
    detail = client.get("/v1/rollouts/v2").json()
    assert detail["status"]["pending"] == 1, story(client, "v2")
    assert detail["states"] == {"Reverting": 1, "RolledBack": 5}
    rid2 = rollout_id("v2")
    with session_scope() as s:
        assert rid2 in rollout_repo.to_reconcile(s)  # beat's tick steps it too

    def revert_step() -> None:
        # The rollout's own steps finish the revert, no drift repair: each pushes the
        # previous version again and observes, and the one that sees 1.0.0 Ready ends
        # the handover, retiring 2.0.0 on the canary.
        for site in sites:
            site.beat()
        assert reconciler.reconcile(rid2, settings) == "RolledBack"

    eventually(lambda: pending("v2") == 0, what="the canary seen on 1.0.0", beat=revert_step)
    with session_scope() as s:
        assert rid2 not in rollout_repo.to_reconcile(s)
    for site in sites:
        eventually(
            site.settled_on("1.0.0"), what=f"{site.name}: only 1.0.0 left", beat=site.finalize
        )
    events = client.get("/v1/rollouts/v2/events").json()
    assert any(e["reason"] == "GateFailed" for e in events)
    assert events[0]["reason"] == "RollbackComplete"  # newest first
    # v1 no longer owns the nodes: v2 claimed them. Undo says so instead of doing nothing.
    assert client.get("/v1/rollouts/v1").json()["states"] == {}
    assert client.get("/v1/rollouts/v2").json()["states"] == {"RolledBack": 6}
    resp = client.post("/v1/rollouts/v1/undo")
    assert resp.status_code == 409
    assert "no longer owns any node" in resp.json()["detail"]


@pytest.fixture
def site(control_plane: ControlPlane) -> Iterator[Site]:
    made = Site("gamma", control_plane, f"ef-{uuid.uuid4().hex[:8]}")
    yield made
    made.cleanup()


def test_delete_cluster_cascade_removes_its_workloads_from_the_cluster(
    client: TestClient, settings: Settings, site: Site
) -> None:
    """``DELETE /v1/clusters/NAME?cascade=true`` on a real API server: the DaemonSets,
    their pods and the nodes' model labels go, then the cluster."""
    assert apply(client, cluster_manifest(site.name, site.cp, site.ns)).status_code == 200
    push_versions(client, "1.0.0")
    selector = {"matchLabels": {"site": site.name}}
    assert apply(client, rollout_doc("g1", "1.0.0", selector=selector)).status_code == 200
    assert run("g1", settings, [site])[-1] == "Succeeded", story(client, "g1")
    eventually(site.only("1.0.0"), what="1.0.0 on every node", beat=site.beat)
    assert client.delete(f"/v1/clusters/{site.name}").status_code == 409
    assert site.only("1.0.0")()  # refused: nothing touched
    # Its API server unreachable: 503, and the cluster and its nodes stay as they were
    # (its nodes: whatever the shared control plane holds, the site's 3 at least).
    nodes = client.get("/v1/nodes", params={"cluster": site.name}).json()["total"]
    assert nodes >= 3
    with session_scope() as s:
        cluster = s.scalars(select(Cluster).where(Cluster.name == site.name)).one()
        server = cluster.spec["server"]
        cluster.spec = {**cluster.spec, "server": f"https://127.0.0.1:{free_port()}"}
    unreachable = client.delete(f"/v1/clusters/{site.name}", params={"cascade": "true"})
    assert unreachable.status_code == 503, unreachable.text
    assert "nothing was deleted" in unreachable.json()["detail"]
    assert client.get("/v1/nodes", params={"cluster": site.name}).json()["total"] == nodes
    with session_scope() as s:
        cluster = s.scalars(select(Cluster).where(Cluster.name == site.name)).one()
        cluster.spec = {**cluster.spec, "server": server}
    assert site.only("1.0.0")()
    gone = client.delete(f"/v1/clusters/{site.name}", params={"cascade": "true"})
    assert gone.status_code == 200, gone.text
    eventually(site.empty, what="no workloads left", beat=site.finalize)
    assert not site.model_labels()
    assert client.get(f"/v1/clusters/{site.name}").status_code == 404
