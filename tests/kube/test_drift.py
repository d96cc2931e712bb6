"""Drift: objects changed or deleted behind the controller's back are restored, and
each repair is an event; node inventory is re-synced on demand."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.db.models import Event
from controller.db.session import session_scope
from controller.fleet.service import repair_drift
from controller.settings import Settings
from node_agent.cluster import handover
from tests.kube.controlplane import make_node
from tests.kube.kubelet import eventually
from tests.kube.test_rollout_engine import Site, cluster_manifest, run, sites
from tests.rollouts.helpers import apply, push_versions, rollout_doc

__all__ = ["sites"]  # the fixture


def test_deleted_and_relabelled_workloads_are_restored(
    client: TestClient, settings: Settings, sites: list[Site]
) -> None:
    alpha = sites[0]
    assert apply(client, cluster_manifest(alpha.name, alpha.cp, alpha.ns)).status_code == 200
    push_versions(client, "1.0.0")
    selector = {"matchLabels": {"site": "alpha"}}
    apply(client, rollout_doc("d", "1.0.0", selector=selector))
    assert run("d", settings, [alpha])[-1] == "Succeeded"
    assert alpha.only("1.0.0")()

    with session_scope() as s:
        assert repair_drift(s, settings) == {}  # nothing to repair yet

    # Behind our back: the DaemonSet is deleted and one node loses its label.
    (ds_name,) = alpha.daemonsets()
    alpha.apps.delete_namespaced_daemon_set(ds_name, alpha.ns)
    victim = alpha.nodes[1]
    alpha.core.patch_node(victim, {"metadata": {"labels": {handover.node_label("detector"): None}}})
    eventually(lambda: not alpha.daemonsets(), what="daemonset gone", beat=alpha.finalize)
    eventually(lambda: not alpha.pods(), what="pods gone", beat=alpha.finalize)

    with session_scope() as s:
        repaired = repair_drift(s, settings)
    assert repaired == {"alpha/detector": sorted(alpha.nodes)}
    eventually(alpha.settled_on("1.0.0"), what="restored", beat=alpha.beat)
    with session_scope() as s:
        event = s.scalars(select(Event).where(Event.reason == "DriftRepaired")).one()
        assert event.object_name == "alpha"
        assert event.data["nodes"] == sorted(alpha.nodes)


def test_resync_on_demand(client: TestClient, sites: list[Site]) -> None:
    alpha = sites[0]
    apply(client, cluster_manifest(alpha.name, alpha.cp, alpha.ns))
    before = client.get("/v1/clusters/alpha").json()["nodes"]
    extra = f"{alpha.nodes[0]}-late"
    make_node(alpha.core, extra, labels={"tier": "retail", "site": "alpha"})
    alpha.nodes.append(extra)  # cleaned up with the others
    resp = client.post("/v1/clusters/alpha/sync")
    assert resp.status_code == 200
    after: dict[str, Any] = resp.json()["nodes"]
    assert after["Ready"] == before["Ready"] + 1
    names = {
        n["name"] for n in client.get("/v1/nodes", params={"cluster": "alpha"}).json()["items"]
    }
    assert extra in names
