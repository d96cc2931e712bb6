"""Pull mode against a real API server: the controller never connects to the cluster
(no address, no credentials stored); the cluster agent (the real node_agent/cluster code,
in a thread) enrols, long-polls the desired state over real HTTP from a real uvicorn
server, applies it with its own identity and reports back. A rollout goes wave by wave,
drift is repaired from the last desired state, a controller down in the middle of a
rollout leaves the cluster where it was (even across a restart of the agent), the
rollout resumes once it is back, and a rollback works."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kubernetes import client as k8s
from pydantic import SecretStr
from sqlalchemy import select

from controller.api.app import create_app
from controller.db.models import Cluster, Event, PullCluster
from controller.db.session import session_scope
from controller.kube import objects
from controller.kube.driver import WorkloadSpec
from controller.kube.pull import PullDriver
from controller.rollouts import reconciler
from controller.settings import Settings
from node_agent.cluster import handover
from node_agent.cluster.contract import INFERENCE_SELECTOR, DesiredState
from node_agent.cluster.kube import KubeApi
from node_agent.cluster.loop import ClusterAgent
from node_agent.cluster.pods import observe_pod
from node_agent.cluster.settings import ClusterAgentSettings
from tests.kube.controlplane import ControlPlane, make_node, mark_pods_ready
from tests.kube.kubelet import eventually, start_pods
from tests.kube.test_chart_rbac import chart_rbac
from tests.kube.test_objects_apply import (
    EndpointWatch,
    Update,
    assert_every_node_served,
)
from tests.kube.test_rollout_engine import Site, story
from tests.live import LiveController
from tests.rollouts.helpers import apply, push_versions, report, rollout_doc, rollout_id

__all__ = ["chart_rbac"]  # the fixture

CLUSTER = "edge"
log = logging.getLogger(__name__)


class RunningAgent:
    """The cluster agent in a thread of its own; stop() and start() again on the same
    state directory, as a restarted pod would."""

    def __init__(self, settings: ClusterAgentSettings) -> None:
        self.settings = settings
        self.agent: ClusterAgent | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ClusterAgent:
        self.agent = ClusterAgent(self.settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.agent.run, args=(self._stop,), daemon=True)
        self._thread.start()
        return self.agent

    def stop(self) -> None:
        if self._thread is not None and self.agent is not None:
            self._stop.set()
            self._thread.join(30)
            assert not self._thread.is_alive()
            self.agent.close()
        self._thread = None


@pytest.fixture
def site(control_plane: ControlPlane) -> Iterator[Site]:
    made = Site(CLUSTER, control_plane, f"ef-{uuid.uuid4().hex[:8]}")
    yield made
    made.cleanup()


@pytest.fixture
def pull_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # Short, so the test sees a silent cluster agent within seconds.
    monkeypatch.setattr(settings, "pull_silent_s", 3.0)
    monkeypatch.setattr(settings, "pull_poll_timeout_s", 2.0)
    return settings


@pytest.fixture
def controller(pull_settings: Settings, committed: None) -> Iterator[LiveController]:
    live = LiveController(create_app(pull_settings))
    live.start()
    yield live
    live.stop()


@pytest.fixture
def api(pull_settings: Settings, committed_client: TestClient) -> TestClient:
    return committed_client


@pytest.fixture
def agent(site: Site, controller: LiveController, tmp_path: Path) -> Iterator[RunningAgent]:
    token = tmp_path / "token"
    token.write_text(site.cp.token)
    running = RunningAgent(
        ClusterAgentSettings(
            controller_url=controller.url,
            cluster=CLUSTER,
            state_dir=tmp_path / "state",
            kubernetes_api_url=site.cp.server,
            kubernetes_token_file=token,
            kubernetes_ca_file=Path(site.cp.ca_cert_path) if site.cp.ca_cert_path else None,
            poll_wait_s=2.0,
            report_interval_s=0.3,
            resync_interval_s=1.0,
            retry_max_s=1.0,
        )
    )
    yield running
    running.stop()


def register(api: TestClient, site: Site, agent: RunningAgent) -> None:
    """The cluster in pull mode, and its agent given the join token an admin issued."""
    resp = apply(api, pull_cluster(site.ns))
    assert resp.status_code == 200, resp.text
    issued = api.post(f"/v1/clusters/{CLUSTER}/pull/join-token", json={"expires": "10m"})
    assert issued.status_code == 201, issued.text
    agent.settings.join_token = SecretStr(issued.json()["token"])


def pull_cluster(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgefleet.io/v1",
        "kind": "Cluster",
        "metadata": {"name": CLUSTER},
        "spec": {"driver": "kubernetes", "mode": "pull", "namespace": namespace},
    }


def step(name: str, settings: Settings, site: Site) -> str:
    """One worker step, then the kubelets and the node agents do their part."""
    phase = reconciler.reconcile(rollout_id(name), settings)
    assert phase is not None
    site.beat()
    report()
    time.sleep(0.25)  # the cluster agent polls, applies and reports meanwhile
    return phase


def run_until(name: str, settings: Settings, site: Site, *, done: str, steps: int = 160) -> None:
    for _ in range(steps):
        if step(name, settings, site) == done:
            return
    raise AssertionError(f"{name} never {done}:\n{story_of(name)}")


def story_of(name: str) -> str:
    with session_scope() as s:
        events = s.scalars(select(Event).where(Event.object_name.in_([name, CLUSTER]))).all()
        return "\n".join(f"{e.reason}: {e.message}" for e in events)


def test_a_rollout_reaches_a_cluster_the_controller_cannot_connect_to(
    api: TestClient,
    pull_settings: Settings,
    site: Site,
    controller: LiveController,
    agent: RunningAgent,
) -> None:
    settings = pull_settings
    register(api, site, agent)
    got = api.get(f"/v1/clusters/{CLUSTER}").json()
    assert (got["mode"], got["server"], got["has_credentials"]) == ("pull", None, False)
    with session_scope() as s:
        row = s.scalars(select(Cluster).where(Cluster.name == CLUSTER)).one()
        assert row.credentials is None
        assert row.api_server is None

    # The agent enrols, reports its nodes, and the controller knows them at once.
    agent.start()

    def known() -> set[str]:
        items = api.get("/v1/nodes", params={"cluster": CLUSTER}).json()["items"]
        return {n["name"] for n in items}

    eventually(lambda: set(site.nodes) <= known(), what="nodes synced from the agent's report")
    assert api.get(f"/v1/clusters/{CLUSTER}").json()["status"] == "Ready"
    with session_scope() as s:
        state = s.scalars(select(PullCluster)).one()
        assert len(state.credential_hash or "") == 64

    # Wave by wave.
    push_versions(api, "1.0.0", "2.0.0")
    selector = {"matchLabels": {"site": CLUSTER}}
    assert apply(api, rollout_doc("v1", "1.0.0", selector=selector)).status_code == 200
    counts: list[int] = []
    for _ in range(160):
        phase = step("v1", settings, site)
        running = len(site.pods())
        if not counts or counts[-1] != running:
            counts.append(running)
        if phase == "Succeeded":
            break
    assert phase == "Succeeded", story(api, "v1")
    assert next(n for n in counts if n) == 1  # the canary alone first
    eventually(site.settled_on("1.0.0"), what="1.0.0 everywhere", beat=site.beat)
    (ds,) = site.apps.list_namespaced_daemon_set(site.ns).items
    # Server-side apply by the push driver's field manager.
    appliers = {f.manager for f in ds.metadata.managed_fields if f.operation == "Apply"}
    assert appliers == {"edgefleet"}

    # Drift: a DaemonSet deleted and a label removed behind the agent's back come back
    # from its last desired state.
    site.apps.delete_namespaced_daemon_set(ds.metadata.name, site.ns)
    victim = site.nodes[1]
    site.core.patch_node(victim, {"metadata": {"labels": {handover.node_label("detector"): None}}})
    eventually(site.settled_on("1.0.0"), what="drift repaired", beat=site.beat)

    # v2 until its canary runs 2.0.0; then the controller goes away.
    assert apply(api, rollout_doc("v2", "2.0.0", selector=selector)).status_code == 200
    for _ in range(160):
        step("v2", settings, site)
        if "2.0.0" in site.pods().values():
            break
    eventually(lambda: len(site.pods()) == 3, what="all three nodes serve", beat=site.beat)
    controller.stop()
    live_agent = agent.agent
    assert live_agent is not None

    def applied() -> bool:  # whatever the agent had fetched, it has applied
        desired = live_agent.desired
        return (
            desired is not None
            and live_agent.applied_revision == desired.revision
            and not live_agent.handing_over
        )

    eventually(applied, what="the agent applied what it had fetched", beat=site.beat)
    before = site.pods()
    assert sorted(before.values()) == ["1.0.0", "1.0.0", "2.0.0"]

    # The worker goes on meanwhile: the agent's reports stop, so after pull_silent_s the
    # nodes hold (a DriverError event), and nothing fails.
    deadline = time.monotonic() + settings.pull_silent_s + 3
    while time.monotonic() < deadline:
        assert step("v2", settings, site) == "Progressing", story(api, "v2")
    assert site.pods() == before
    with session_scope() as s:
        silent = s.scalars(select(Event).where(Event.reason == "DriverError")).all()
        assert any("has not reported" in e.message for e in silent)

    # A restart of the agent with the controller still down: its state on disk drives
    # the cluster, and drift is repaired from it.
    agent.stop()
    for d in site.apps.list_namespaced_daemon_set(site.ns).items:
        site.apps.delete_namespaced_daemon_set(d.metadata.name, site.ns)
    eventually(lambda: not site.pods(), what="workloads gone", beat=site.finalize)
    agent.start()
    eventually(lambda: site.pods() == before, what="last desired state restored", beat=site.beat)

    # The controller comes back; the rollout resumes and finishes.
    controller.start()
    run_until("v2", settings, site, done="Succeeded")
    eventually(site.settled_on("2.0.0"), what="2.0.0 everywhere", beat=site.beat)

    # Rollback: undo puts 1.0.0 back on every node, and 2.0.0's DaemonSet goes.
    assert api.post("/v1/rollouts/v2/undo").status_code == 202
    run_until("v2", settings, site, done="RolledBack")
    eventually(site.settled_on("1.0.0"), what="rolled back to 1.0.0", beat=site.beat)
    # The rollback is over once the cluster agent reported every node back on 1.0.0.

    def pending() -> int:
        return int(api.get("/v1/rollouts/v2").json()["status"]["pending"])

    eventually(
        lambda: pending() == 0,
        what="every node seen on 1.0.0",
        beat=lambda: step("v2", settings, site),
    )
    assert set(api.get("/v1/rollouts/v2").json()["states"]) == {"RolledBack"}


def _agent_with_the_charts_rights(
    control_plane: ControlPlane, tmp_path: Path
) -> tuple[KubeApi, ClusterAgent]:
    """A cluster agent whose kube client is the user the chart's RBAC is bound to, and
    whose controller is unreachable (the tests set its desired state by hand)."""
    token = tmp_path / "token"
    token.write_text(control_plane.driver_token)
    kube = KubeApi(
        api_url=control_plane.server,
        token_file=token,
        ca_file=Path(control_plane.ca_cert_path) if control_plane.ca_cert_path else None,
    )
    agent = ClusterAgent(
        ClusterAgentSettings(
            controller_url="http://127.0.0.1:9", cluster=CLUSTER, state_dir=tmp_path / "state"
        ),
        kube=kube,
    )
    return kube, agent


def test_the_cluster_agent_works_with_exactly_the_chart_rbac(
    control_plane: ControlPlane, chart_rbac: str, tmp_path: Path
) -> None:
    """The agent chart binds the cluster agent to the driver's Role and ClusterRole (as
    it binds the controller in push mode): with exactly those rights, rendered by Helm
    and applied to a real API server, the agent applies, reads and cleans up."""
    ns = chart_rbac
    kube, agent = _agent_with_the_charts_rights(control_plane, tmp_path)
    admin: Any = k8s.CoreV1Api(control_plane.api_client())
    node = f"edge-{uuid.uuid4().hex[:6]}"
    make_node(admin, node, labels={"tier": "retail"})
    spec = WorkloadSpec("detector", "1.0.0", "cd" * 32, "onnx", "http://c/a", "r", {})
    label = handover.node_label("detector")
    try:
        agent.desired = DesiredState(
            cluster=CLUSTER,
            revision=1,
            changed=True,
            namespace=ns,
            secret=objects.artifact_secret(ns, "token-1"),
            daemonsets=[objects.daemonset(spec, namespace=ns, image="img:1", port=8500)],
            services=[objects.service("detector", namespace=ns, port=8500)],
            node_labels={node: {label: "1.0.0"}},
            poll_timeout_s=1,
        )
        assert agent.apply_once()
        assert agent.apply_error is None
        assert (admin.read_node(node).metadata.labels or {}).get(label) == "1.0.0"
        admin.read_namespaced_service(objects.service_name("detector"), ns)

        def observed() -> list[str]:
            seen = [observe_pod(p) for p in kube.list_pods(ns, INFERENCE_SELECTOR)]
            return [w.node for w in seen if w is not None]

        eventually(lambda: node in observed(), what="the agent sees the pod for its node")
        assert node in {n["metadata"]["name"] for n in kube.list_nodes()}

        # Nothing wanted any more: the label goes and the DaemonSet is deleted.
        agent.desired = agent.desired.model_copy(
            update={
                "revision": 2,
                "daemonsets": [],
                "services": [],
                "node_labels": {node: {label: None}},
            }
        )
        assert agent.apply_once()
        assert agent.apply_error is None
        assert label not in (admin.read_node(node).metadata.labels or {})
        apps: Any = k8s.AppsV1Api(control_plane.api_client())
        left = apps.list_namespaced_daemon_set(ns).items
        assert all(d.metadata.deletion_timestamp for d in left)
        assert not admin.list_namespaced_service(ns).items
    finally:
        admin.delete_node(node)
        agent.close()


def test_the_cluster_agent_hands_over_once_the_endpoints_route_to_the_new_pod(
    control_plane: ControlPlane, chart_rbac: str, tmp_path: Path
) -> None:
    """The agent, with exactly the chart's RBAC, keeps the old version while the new
    pod is Ready but not among the ready addresses of the model's Endpoints (Ready
    before it has an IP: the endpoints controller cannot list it), and releases it at
    the first apply after they list it."""
    ns = chart_rbac
    kube, agent = _agent_with_the_charts_rights(control_plane, tmp_path)
    admin: Any = k8s.CoreV1Api(control_plane.api_client())
    node = f"edge-{uuid.uuid4().hex[:6]}"
    make_node(admin, node, labels={"tier": "retail"})
    label, prev = handover.node_label("detector"), handover.previous_label("detector")

    def desire(revision: int, version: str) -> DesiredState:
        spec = WorkloadSpec("detector", version, "cd" * 32, "onnx", "http://c/a", "r", {})
        return DesiredState(
            cluster=CLUSTER,
            revision=revision,
            changed=True,
            namespace=ns,
            secret=objects.artifact_secret(ns, "token-1"),
            daemonsets=[objects.daemonset(spec, namespace=ns, image="img:1", port=8500)],
            services=[objects.service("detector", namespace=ns, port=8500)],
            node_labels={node: {label: version}},
            poll_timeout_s=1,
        )

    def apply_cleanly() -> None:
        assert agent.apply_once()
        assert agent.apply_error is None

    def labels() -> tuple[str | None, str | None]:
        got = admin.read_node(node).metadata.labels or {}
        return got.get(label), got.get(prev)

    def routed() -> set[str]:
        return {
            p.metadata.labels["edgefleet.io/version"]
            for p in admin.list_namespaced_pod(ns).items
            if p.metadata.name in handover.routed_pods(kube.list_endpoints(ns, INFERENCE_SELECTOR))
        }

    try:
        agent.desired = desire(1, "1.0.0")
        apply_cleanly()
        eventually(
            lambda: routed() == {"1.0.0"}, what="v1 served", beat=lambda: start_pods(admin, ns)
        )
        agent.desired = desire(2, "2.0.0")
        apply_cleanly()
        assert labels() == ("2.0.0", "1.0.0")
        eventually(lambda: len(admin.list_namespaced_pod(ns).items) == 2, what="a v2 pod beside v1")
        mark_pods_ready(admin, ns, INFERENCE_SELECTOR)  # v2 Ready, with no IP yet
        for _ in range(3):
            apply_cleanly()
            assert labels() == ("2.0.0", "1.0.0")  # v1 still serves
            assert routed() == {"1.0.0"}
            time.sleep(0.5)
        eventually(
            lambda: "2.0.0" in routed(),
            what="v2 in the Endpoints",
            beat=lambda: start_pods(admin, ns),
        )
        apply_cleanly()
        assert labels() == ("2.0.0", None)
    finally:
        admin.delete_node(node)
        agent.close()


def previous_labels(site: Site) -> dict[str, str]:
    """The previous labels of the site's nodes: handovers under way."""
    out = {}
    for node in site.nodes:
        labels = site.core.read_node(node).metadata.labels or {}
        out.update({f"{node}/{k}": v for k, v in labels.items() if k.startswith("previous.")})
    return out


def test_a_pull_mode_version_change_keeps_every_node_served(
    api: TestClient,
    pull_settings: Settings,
    site: Site,
    controller: LiveController,
    agent: RunningAgent,
) -> None:
    """Make before break in pull mode: the controller publishes a new version (the pull
    driver, as the reconciler calls it), the cluster agent surges the new pod beside the
    old one and drops the old one only once the new one is Ready. Through two updates,
    a rollback and a change reverted half-way, every node's Service has a Ready pod of
    the version it leaves or the one it moves to at every sample, and both serve
    together for a while."""
    register(api, site, agent)
    agent.start()
    nodes = site.nodes
    versions = ["1.0.0", "2.0.0", "3.0.0"]

    def publish(version: str) -> None:
        spec = WorkloadSpec("detector", version, "cd" * 32, "onnx", "http://c/a", "r", {})
        with session_scope() as s:
            PullDriver(s, CLUSTER, silent_after_s=60).apply("detector", dict.fromkeys(nodes, spec))

    def beat() -> None:
        start_pods(site.core, site.ns)

    watch: EndpointWatch | None = None

    def serving(version: str) -> bool:
        assert watch is not None
        return (
            watch.now() == {n: {version} for n in nodes}
            and site.only(version)()
            and not previous_labels(site)
        )

    eventually(lambda: agent.agent and agent.agent.reports, what="the agent reports")
    publish("1.0.0")

    def service() -> Any:
        found = site.core.list_namespaced_service(site.ns).items
        return found[0] if found else None

    svc = eventually(service, what="the model's Service, applied by the agent")
    assert svc.metadata.name == objects.service_name("detector")
    assert svc.spec.selector == objects.model_selector("detector")
    # Kubernetes 1.20 has no internalTrafficPolicy: the agent leaves it out there.
    assert "internalTrafficPolicy" not in (svc.to_dict()["spec"] or {})
    watch = EndpointWatch(site.core, site.ns, versions)
    updates: list[Update] = []
    try:
        eventually(lambda: serving("1.0.0"), what="1.0.0 served on every node", beat=beat)
        for old, new in [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0"), ("3.0.0", "2.0.0")]:
            started = time.monotonic()
            publish(new)
            eventually(partial(serving, new), what=f"{new} served", beat=beat, timeout_s=60)
            updates.append((started, time.monotonic(), old, new))
        # A change reverted in the middle of its handover: 2.0.0 serves throughout.
        started = time.monotonic()
        publish("1.0.0")
        eventually(
            lambda: previous_labels(site) or "1.0.0" in site.pods().values(),
            what="the handover to 1.0.0 under way",
            beat=beat,
        )
        publish("2.0.0")
        eventually(partial(serving, "2.0.0"), what="2.0.0 served", beat=beat, timeout_s=60)
        updates.append((started, time.monotonic(), "1.0.0", "2.0.0"))
    finally:
        watch.stop()

    assert_every_node_served(watch, nodes, updates)
    # The handovers left nothing behind: one DaemonSet, no previous labels.
    eventually(site.settled_on("2.0.0"), what="2.0.0 alone", beat=site.finalize)
    assert not previous_labels(site)
