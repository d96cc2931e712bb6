"""The driver works with exactly the permissions the edge agent chart grants: its Role,
ClusterRole and bindings, rendered by Helm's own engine, applied to a real API server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.kube.client import Forbidden, KubernetesDriver
from controller.kube.driver import WorkloadSpec
from tests.deploy.kube import objects, render
from tests.kube.apply import applied
from tests.kube.controlplane import ControlPlane, make_node
from tests.kube.kubelet import eventually

DRIVER_USER = {"kind": "User", "name": "edgefleet-driver", "apiGroup": "rbac.authorization.k8s.io"}


@pytest.fixture
def chart_rbac(control_plane: ControlPlane) -> Iterator[str]:
    """Apply the chart's RBAC (bound to the control plane's restricted user)."""
    ns = f"ef-{uuid.uuid4().hex[:8]}"
    release = f"agent-{uuid.uuid4().hex[:5]}"
    rendered = objects(
        render(
            "edgefleet-agent",
            {"rbac": {"workloadNamespace": ns, "extraSubjects": [DRIVER_USER]}},
            release=release,
            namespace="edgefleet-system",
        )
    )
    wanted = {"Namespace", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    rbac_objects = [o for o in rendered if o["kind"] in wanted]
    assert {o["kind"] for o in rbac_objects} == wanted
    with applied(k8s.ApiClient(control_plane.client_configuration()), rbac_objects):
        yield ns


def test_driver_works_with_exactly_the_chart_rbac(
    control_plane: ControlPlane, chart_rbac: str
) -> None:
    ca = Path(control_plane.ca_cert_path).read_text() if control_plane.ca_cert_path else None
    creds: dict[str, Any] = {"token": control_plane.driver_token}
    creds.update({"caData": ca} if ca else {"insecureSkipTLSVerify": True})
    driver = KubernetesDriver(
        "edge",
        server=control_plane.server,
        namespace=chart_rbac,
        credentials=creds,
        image="img:1",
        port=8500,
    )
    core: Any = k8s.CoreV1Api(control_plane.api_client())
    node = f"edge-{uuid.uuid4().hex[:6]}"
    make_node(core, node, labels={"tier": "retail"})
    try:
        driver.check()
        assert node in {n.name for n in driver.list_nodes()}
        spec = WorkloadSpec("detector", "1.0.0", "cd" * 32, "onnx", "http://c/a", "r", {})
        driver.apply("detector", {node: spec})
        eventually(
            lambda: driver.observe("detector", [node])[node].phase != "Absent",
            what="a pod for the node",
        )
        driver.apply("detector", {node: None})
        assert driver.workloads("detector") == [] or all(
            w["metadata"].get("deletionTimestamp") for w in driver.workloads("detector")
        )
        # And nothing more: the same identity may not touch another namespace.
        other = KubernetesDriver(
            "edge",
            server=control_plane.server,
            namespace="default",
            credentials=creds,
            image="img:1",
            port=8500,
        )
        with pytest.raises(Forbidden, match="create daemonsets"):
            other.check()
    finally:
        core.delete_node(node)
        driver.close()
