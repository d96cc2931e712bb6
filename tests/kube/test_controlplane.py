"""Integration tests of the real Kubernetes control plane that the driver tests run against."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from tests.kube.conftest import require_kube_binaries
from tests.kube.controlplane import (
    KUBE_VERSION,
    ControlPlane,
    kube_binaries,
    make_node,
    mark_pods_ready,
    start_control_plane,
)

pytestmark = pytest.mark.kube

T = TypeVar("T")
WAIT_S = 60.0


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture
def core(control_plane: ControlPlane) -> Iterator[Any]:
    with control_plane.api_client() as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
def apps(control_plane: ControlPlane) -> Iterator[Any]:
    with control_plane.api_client() as api_client:
        yield client.AppsV1Api(api_client)


@pytest.fixture
def namespace(core: Any) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def deployment(
    name: str, *, replicas: int, node_selector: dict[str, str], cpu: str, memory: str
) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": node_selector,
                    "containers": [
                        {
                            "name": "model",
                            "image": "registry.local/edgefleet/model-server:1",
                            "resources": {"requests": {"cpu": cpu, "memory": memory}},
                        }
                    ],
                },
            },
        },
    }


def test_kube_binaries_names_the_build_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGEFLEET_KUBE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"scripts/kube-control-plane\.sh"):
        kube_binaries()


def test_apiserver_answers_with_admin_token(control_plane: ControlPlane, core: Any) -> None:
    assert control_plane.ca_cert_path is not None
    with control_plane.api_client() as api_client:
        version = client.VersionApi(api_client).get_code()
    assert version.git_version == KUBE_VERSION
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_kubeconfig_loads_with_the_official_client(control_plane: ControlPlane) -> None:
    from kubernetes import config

    load: Any = config.new_client_from_config  # untyped in the client's stubs
    api_client = load(config_file=control_plane.kubeconfig_path)
    with api_client:
        assert client.VersionApi(api_client).get_code().git_version == KUBE_VERSION


def test_wrong_token_is_unauthorized(control_plane: ControlPlane) -> None:
    with (
        control_plane.api_client(token="not-a-token") as api_client,
        pytest.raises(ApiException) as exc,
    ):
        client.CoreV1Api(api_client).list_namespaced_pod("default")
    assert exc.value.status == 401


def test_restricted_token_gets_403_until_granted(
    control_plane: ControlPlane, namespace: str
) -> None:
    with control_plane.api_client(token=control_plane.driver_token) as api_client:
        driver = client.CoreV1Api(api_client)
        with pytest.raises(ApiException) as exc:
            driver.list_namespaced_pod(namespace)
        assert exc.value.status == 403
        assert "edgefleet-driver" in str(exc.value.body)

        with control_plane.api_client() as admin_client:
            rbac: Any = client.RbacAuthorizationV1Api(admin_client)
            rbac.create_namespaced_role(
                namespace,
                {
                    "metadata": {"name": "pod-reader"},
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
                },
            )
            rbac.create_namespaced_role_binding(
                namespace,
                {
                    "metadata": {"name": "driver-reads-pods"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": "pod-reader",
                    },
                    "subjects": [
                        {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "User",
                            "name": control_plane.driver_user,
                        }
                    ],
                },
            )

        def can_list() -> bool:
            try:
                driver.list_namespaced_pod(namespace)
            except ApiException as e:
                if e.status != 403:
                    raise
                return False
            return True

        wait_for("the RoleBinding to take effect", can_list, timeout=10)
        # Exactly what was granted: not another namespace, not another verb.
        with pytest.raises(ApiException) as other_ns:
            driver.list_namespaced_pod("default")
        assert other_ns.value.status == 403
        with pytest.raises(ApiException) as other_verb:
            driver.delete_collection_namespaced_pod(namespace)
        assert other_verb.value.status == 403


def test_deployment_is_scheduled_by_node_selector_and_becomes_available(
    core: Any, apps: Any, namespace: str
) -> None:
    site = secrets.token_hex(3)
    make_node(core, f"edge-{site}-a", labels={"edgefleet.io/site": f"{site}-a"})
    make_node(
        core, f"edge-{site}-b", labels={"edgefleet.io/site": f"{site}-b"}, cpu="2", arch="arm64"
    )
    node = core.read_node(f"edge-{site}-b")
    assert node.status.allocatable["cpu"] == "2"
    assert node.status.node_info.architecture == "arm64"
    assert not any(t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or [])

    apps.create_namespaced_deployment(
        namespace,
        deployment(
            "detector",
            replicas=3,
            node_selector={"edgefleet.io/site": f"{site}-b", "kubernetes.io/arch": "arm64"},
            cpu="500m",
            memory="256Mi",
        ),
    )

    def bound_pods() -> list[Any] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="app=detector").items
        if len(pods) == 3 and all(p.spec.node_name for p in pods):
            return list(pods)
        return None

    pods = wait_for("3 pods bound to a node", bound_pods)
    assert {p.spec.node_name for p in pods} == {f"edge-{site}-b"}

    def available() -> int | None:
        mark_pods_ready(core, namespace, "app=detector")
        dep = apps.read_namespaced_deployment("detector", namespace)
        return 3 if (dep.status.available_replicas or 0) == 3 else None

    wait_for("the Deployment to have 3 available replicas", available)
    assert mark_pods_ready(core, namespace, "app=detector") == 3
    for pod in core.list_namespaced_pod(namespace, label_selector="app=detector").items:
        assert pod.status.phase == "Running"
        assert all(cs.ready for cs in pod.status.container_statuses)


def test_requests_beyond_allocatable_stay_pending(core: Any, apps: Any, namespace: str) -> None:
    site = secrets.token_hex(3)
    make_node(core, f"small-{site}", labels={"edgefleet.io/site": site}, cpu="1", memory="1Gi")
    apps.create_namespaced_deployment(
        namespace,
        deployment(
            "too-big",
            replicas=1,
            node_selector={"edgefleet.io/site": site},
            cpu="2",
            memory="512Mi",
        ),
    )

    def unschedulable() -> Any:
        for pod in core.list_namespaced_pod(namespace, label_selector="app=too-big").items:
            for cond in pod.status.conditions or []:
                if cond.type == "PodScheduled" and cond.status == "False":
                    return pod if cond.reason == "Unschedulable" else None
        return None

    pod = wait_for("PodScheduled=False reason Unschedulable", unschedulable)
    assert pod.status.phase == "Pending"
    assert not pod.spec.node_name

    def failed_scheduling() -> Any:
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
        ).items
        return [e for e in events if e.reason == "FailedScheduling"] or None

    events = wait_for("a FailedScheduling event", failed_scheduling)
    assert "Insufficient cpu" in events[0].message

    dep = apps.read_namespaced_deployment("too-big", namespace)
    assert not dep.status.available_replicas


def test_two_control_planes_at_once(
    control_plane: ControlPlane, second_control_plane: ControlPlane
) -> None:
    assert control_plane.server != second_control_plane.server
    assert control_plane.running()
    assert second_control_plane.running()
    name = f"only-in-a-{secrets.token_hex(3)}"
    with control_plane.api_client() as a, second_control_plane.api_client() as b:
        core_a: Any = client.CoreV1Api(a)
        core_a.create_namespace({"metadata": {"name": name}})
        core_b: Any = client.CoreV1Api(b)
        assert name not in {ns.metadata.name for ns in core_b.list_namespace().items}
        assert client.VersionApi(b).get_code().git_version == KUBE_VERSION
        core_a.delete_namespace(name)
    # Each plane has its own tokens.
    with second_control_plane.api_client(token=control_plane.token) as b_with_a_token:
        with pytest.raises(ApiException) as exc:
            client.CoreV1Api(b_with_a_token).list_namespace()
        assert exc.value.status == 401


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    require_kube_binaries()
    cp = start_control_plane(tmp_path, name="short-lived")
    pids = cp.pids
    assert len(pids) == 4
    assert cp.running()
    cp.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
    assert not cp.running()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_missing_binaries_fail_never_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_KUBE_CACHE", str(tmp_path))
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match=r"kube-control-plane\.sh"):
            require_kube_binaries()
