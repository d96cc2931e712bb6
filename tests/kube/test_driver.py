"""The Kubernetes driver against a real kube-apiserver, controller-manager and scheduler
(built from Debian's kubernetes source); tests/kube/kubelet.py stands in for kubelets."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.kube import objects
from controller.kube.client import Conflict, Forbidden, KubernetesDriver, Unreachable
from controller.kube.driver import WorkloadSpec
from node_agent.cluster import handover
from tests.kube.controlplane import ControlPlane, credentials, make_node
from tests.kube.kubelet import eventually, finalize_terminating_pods, start_pods

RESOURCES = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}


def spec(
    version: str, *, resources: dict[str, Any] | None = None, model: str = "detector"
) -> WorkloadSpec:
    return WorkloadSpec(
        model=model,
        version=version,
        sha256="ab" * 32,
        format="onnx",
        artifact_url=f"http://controller/v1/models/{model}/versions/{version}/artifact",
        rollout="r",
        resources=resources or RESOURCES,
    )


@pytest.fixture
def nodes(core: Any) -> Iterator[list[str]]:
    names = [f"edge-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    make_node(core, names[0], labels={"tier": "retail"})
    make_node(core, names[1], labels={"tier": "retail"}, arch="arm64")
    make_node(core, names[2], labels={"tier": "lab"}, memory="256Mi")
    yield names
    for name in names:
        core.delete_node(name)


def pods_on(core: Any, ns: str) -> dict[str, str]:
    return {
        p.spec.node_name: p.metadata.labels["edgefleet.io/version"]
        for p in core.list_namespaced_pod(ns).items
        if p.spec.node_name and p.metadata.deletion_timestamp is None
    }


def test_node_inventory(driver: KubernetesDriver, nodes: list[str]) -> None:
    inv = {n.name: n for n in driver.list_nodes()}
    assert set(nodes) <= set(inv)
    assert inv[nodes[0]].labels["tier"] == "retail"
    assert inv[nodes[1]].architecture == "arm64"
    assert inv[nodes[2]].allocatable == {"cpu": "4", "memory": "256Mi"}
    assert inv[nodes[0]].ready is True


def test_apply_pins_pods_and_reapply_changes_nothing(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    driver.apply("detector", {nodes[0]: spec("1.0.0"), nodes[1]: spec("1.0.0")})
    eventually(
        lambda: pods_on(core, ns) == {nodes[0]: "1.0.0", nodes[1]: "1.0.0"}, what="pods scheduled"
    )
    obs = driver.observe("detector", nodes)
    assert obs[nodes[0]].phase == "Pending"
    assert obs[nodes[2]].phase == "Absent"
    start_pods(core, ns)
    obs = driver.observe("detector", nodes)
    assert (obs[nodes[0]].phase, obs[nodes[0]].version, obs[nodes[0]].sha256) == (
        "Ready",
        "1.0.0",
        "ab" * 32,
    )

    (ds,) = driver.workloads("detector")
    assert ds["metadata"]["managedFields"][0]["manager"] == "edgefleet"
    assert ds["metadata"]["managedFields"][0]["operation"] == "Apply"
    # generation counts spec changes (status updates by the DaemonSet controller do not).
    before = ds["metadata"]["generation"]
    driver.apply("detector", {nodes[0]: spec("1.0.0"), nodes[1]: spec("1.0.0")})
    assert driver.workloads("detector")[0]["metadata"]["generation"] == before


def test_moving_a_node_to_a_new_version(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    driver.apply("detector", {nodes[0]: spec("1.0.0"), nodes[1]: spec("1.0.0")})
    eventually(
        lambda: len(pods_on(core, ns)) == 2, what="v1 pods", beat=lambda: start_pods(core, ns)
    )
    driver.apply("detector", {nodes[0]: spec("2.0.0")})

    def beat() -> None:  # the kubelet, and the reconciler observing (finishes handovers)
        start_pods(core, ns)
        driver.observe("detector", nodes)

    eventually(
        lambda: pods_on(core, ns) == {nodes[0]: "2.0.0", nodes[1]: "1.0.0"},
        what="node 0 on v2, node 1 still on v1",
        beat=beat,
    )
    assert {
        w["metadata"]["labels"]["edgefleet.io/version"] for w in driver.workloads("detector")
    } == {"1.0.0", "2.0.0"}


def test_removal_leaves_nothing_behind(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    driver.apply("detector", {nodes[0]: spec("1.0.0"), nodes[1]: spec("2.0.0")})
    eventually(lambda: len(pods_on(core, ns)) == 2, what="pods", beat=lambda: start_pods(core, ns))
    driver.apply("detector", {nodes[0]: None, nodes[1]: None})
    eventually(
        lambda: not driver.workloads("detector") and not core.list_namespaced_pod(ns).items,
        what="no daemonsets and no pods",
        beat=lambda: finalize_terminating_pods(core, ns),
    )
    labels = {n.metadata.name: n.metadata.labels for n in core.list_node().items}
    assert all(handover.node_label("detector") not in labels[n] for n in nodes)


def test_limits_larger_than_allocatable_are_unschedulable(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    big = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    driver.apply("detector", {nodes[2]: spec("1.0.0", resources=big)})  # the 256Mi node
    obs = eventually(
        lambda: (o := driver.observe("detector", [nodes[2]])[nodes[2]]).phase == "Failed" and o,
        what="an Unschedulable observation",
    )
    assert obs.reason.startswith("Unschedulable")
    assert "Insufficient memory" in obs.reason


def test_conflicting_manager_is_reported_not_forced(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str, control_plane: ControlPlane
) -> None:
    driver.apply("detector", {nodes[0]: spec("1.0.0")})
    (ds,) = driver.workloads("detector")
    name = ds["metadata"]["name"]
    apps = k8s.AppsV1Api(control_plane.api_client())
    # A human takes over one of our fields with kubectl's server-side apply --force.
    human = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 3}}
        },
    }
    apps.patch_namespaced_daemon_set(
        name,
        ns,
        human,
        field_manager="kubectl",
        force=True,
        _content_type="application/apply-patch+yaml",
    )
    with pytest.raises(Conflict, match="owned by another manager"):
        driver.apply("detector", {nodes[0]: spec("1.0.0")})
    assert (
        driver.workloads("detector")[0]["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
        == 3
    )


def test_rbac_exactly_what_the_driver_needs(
    control_plane: ControlPlane, ns: str, driver: KubernetesDriver, nodes: list[str]
) -> None:
    restricted = KubernetesDriver(
        "a",
        server=control_plane.server,
        namespace=ns,
        credentials=credentials(control_plane, control_plane.driver_token),
        image="x",
        port=1,
        artifact_token=lambda: token,
    )
    token = "efa1.a.1.first"
    with pytest.raises(Forbidden, match=r"lacks: create daemonsets\.apps in namespace"):
        restricted.check()
    rbac: Any = k8s.RbacAuthorizationV1Api(control_plane.api_client())
    user = [{"kind": "User", "name": "edgefleet-driver", "apiGroup": "rbac.authorization.k8s.io"}]
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "edgefleet-driver"},
            "rules": [
                {
                    "apiGroups": ["apps"],
                    "resources": ["daemonsets"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["pods", "events", "endpoints"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["services"],
                    "verbs": ["get", "list", "create", "patch", "delete"],
                },
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": [objects.ARTIFACT_SECRET],
                    "verbs": ["get", "patch"],
                },
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "edgefleet-driver"},
            "roleRef": {
                "kind": "Role",
                "name": "edgefleet-driver",
                "apiGroup": "rbac.authorization.k8s.io",
            },
            "subjects": user,
        },
    )
    with pytest.raises(Forbidden, match=r"lacks: list nodes, patch nodes \("):
        restricted.check()
    name = f"edgefleet-driver-{ns}"
    rbac.create_cluster_role(
        {
            "metadata": {"name": name},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["nodes"],
                    "verbs": ["get", "list", "watch", "patch"],
                }
            ],
        }
    )
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {
                "kind": "ClusterRole",
                "name": name,
                "apiGroup": "rbac.authorization.k8s.io",
            },
            "subjects": user,
        }
    )
    try:
        restricted.check()  # exactly these permissions are enough
        assert set(nodes) <= {n.name for n in restricted.list_nodes()}
        # ... to create the artifact Secret too (check, as every node sync does), which
        # the pods read their download token from, and to refresh it.
        core: Any = k8s.CoreV1Api(control_plane.api_client())
        secret = core.read_namespaced_secret(objects.ARTIFACT_SECRET, ns)
        assert base64.b64decode(secret.data["token"]).decode() == "efa1.a.1.first"
        restricted.apply("detector", {nodes[0]: spec("1.0.0")})
        secret = core.read_namespaced_secret(objects.ARTIFACT_SECRET, ns)
        assert base64.b64decode(secret.data["token"]).decode() == "efa1.a.1.first"
        (ds,) = restricted.workloads("detector")
        env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {
            "name": objects.ARTIFACT_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": objects.ARTIFACT_SECRET, "key": "token"}},
        } in env
        generation = ds["metadata"]["generation"]
        token = "efa1.a.2.second"
        restricted.apply("detector", {nodes[0]: spec("1.0.0")})
        secret = core.read_namespaced_secret(objects.ARTIFACT_SECRET, ns)
        assert base64.b64decode(secret.data["token"]).decode() == "efa1.a.2.second"
        # A new token reaches new pods through the Secret: no DaemonSet change, no restart.
        assert restricted.workloads("detector")[0]["metadata"]["generation"] == generation
    finally:
        rbac.delete_cluster_role_binding(name)
        rbac.delete_cluster_role(name)
        restricted.close()


def test_unreachable_server_is_transient() -> None:
    d = KubernetesDriver(
        "gone",
        server="https://127.0.0.1:1",
        namespace="x",
        credentials={"token": "t", "insecureSkipTLSVerify": True},
        image="x",
        port=1,
        timeout_s=2,
        backoff=(0.05,),
    )
    with pytest.raises(Unreachable) as info:
        d.list_nodes()
    assert info.value.transient is True


def test_objects_validate_against_kubernetes_schemas() -> None:
    import kubernetes_validate  # type: ignore[import-untyped]

    ds = objects.daemonset(spec("1.0.0"), namespace="edgefleet-workloads", image="img:1", port=8500)
    for version in ("1.30.0", "1.31.0", "1.32.0"):
        for obj in (ds, objects.namespace("edgefleet-workloads")):
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize(
    ("container_state", "reason"),
    [
        (
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull failed"}}},
            "ImagePullBackOff",
        ),
        (
            {
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
            },
            "OOMKilled",
        ),
    ],
)
def test_pod_failure_reasons_are_observed(
    driver: KubernetesDriver,
    nodes: list[str],
    core: Any,
    ns: str,
    container_state: dict[str, Any],
    reason: str,
) -> None:
    """What a kubelet reports for a bad image or an OOM kill reaches the observation."""
    driver.apply("detector", {nodes[0]: spec("1.0.0")})
    pod = eventually(lambda: next(iter(core.list_namespaced_pod(ns).items), None), what="the pod")
    status = {
        "phase": "Running" if reason == "OOMKilled" else "Pending",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {
                "name": "inference",
                "image": "ghcr.io/edgefleet/inference:test",
                "imageID": "",
                "ready": False,
                "restartCount": 3 if reason == "OOMKilled" else 0,
                **container_state,
            }
        ],
    }
    core.patch_namespaced_pod_status(pod.metadata.name, ns, {"status": status})
    obs = driver.observe("detector", [nodes[0]])[nodes[0]]
    assert (obs.phase, obs.reason) == ("Failed", reason)
    assert obs.restarts == (3 if reason == "OOMKilled" else 0)
