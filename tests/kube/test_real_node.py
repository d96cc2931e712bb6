"""A real kubelet runs the shipped inference image: the pod the controller's driver
describes starts from the image built from docker/inference.Dockerfile, serves a real
model and answers a real inference request; its cgroup limits are the ones its spec
asked for; a pod over its memory limit is OOMKilled by the kernel, as the API server
reports it.

The artifact comes from the node-local cache that the DaemonSet mounts (a hostPath),
filled beforehand with the verified bytes, as a node that served the version before
has it: the pods are on a bridge of their own and reach no server of the test."""

from __future__ import annotations

import hashlib
import ipaddress
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from kubernetes import client as k8s

from controller.kube.client import KubernetesDriver
from controller.kube.driver import WorkloadSpec
from controller.kube.objects import CACHE_DIR
from controller.registry import samples
from tests.kube.controlplane import ControlPlane
from tests.kube.kubelet import eventually
from tests.kube.node import BuiltImage, Node

pytestmark = pytest.mark.kube

PORT = 8500
POD_TIMEOUT_S = 180.0
LIMITS = {"cpu": "500m", "memory": "256Mi"}
REQUESTS = {"cpu": "100m", "memory": "128Mi"}


@pytest.fixture
def core(node_control_plane: ControlPlane) -> Any:
    return k8s.CoreV1Api(node_control_plane.api_client())


@pytest.fixture
def namespace(core: Any) -> Iterator[str]:
    name = f"ef-real-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def _pod_events(core: Any, namespace: str) -> str:
    events = core.list_namespaced_event(namespace).items
    return "\n".join(f"  {e.involved_object.name}: {e.reason}: {e.message}" for e in events)


def test_the_node_is_a_real_kubelet_on_containerd(real_node: Node, core: Any) -> None:
    node = core.read_node(real_node.name)
    info = node.status.node_info
    assert info.kubelet_version == "v1.20.2"
    assert info.container_runtime_version.startswith("containerd://1.6.")
    assert node.metadata.labels["edgefleet.io/real-node"] == "true"
    assert not [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]
    assert "k8s.gcr.io/pause:3.2" in real_node.images()


def test_the_inference_image_serves_a_model_within_its_limits(
    real_node: Node,
    node_control_plane: ControlPlane,
    shipped_images: dict[str, BuiltImage],
    core: Any,
    namespace: str,
) -> None:
    model = samples.build_cnn()
    sha = hashlib.sha256(model).hexdigest()
    # The node's hostPath cache (CACHE_DIR under the node's /var/lib), as the previous pod
    # of this version left it: the server finds the verified bytes and downloads nothing.
    cached = real_node.host_dir / Path(CACHE_DIR).relative_to("/var/lib") / "sha256" / sha[:2]
    cached.mkdir(parents=True, exist_ok=True)
    (cached / sha).write_bytes(model)

    cp = node_control_plane
    assert cp.ca_cert_path
    driver = KubernetesDriver(
        "real",
        server=cp.server,
        namespace=namespace,
        credentials={"token": cp.token, "caData": Path(cp.ca_cert_path).read_text()},
        image=shipped_images["inference"].ref,
        port=PORT,
        artifact_token=lambda: "unused-the-artifact-is-cached",
    )
    driver.check()  # every permission, the namespace, the artifact token Secret
    spec = WorkloadSpec(
        model="cnn",
        version="1",
        sha256=sha,
        format="onnx",
        # Never contacted: the cache has the bytes. Port 9 (discard) on the pod's own
        # loopback, so a download attempt would fail at once rather than go anywhere.
        artifact_url="http://127.0.0.1:9/v1/models/cnn/versions/1/artifact",
        rollout="real-node",
        resources={"requests": REQUESTS, "limits": LIMITS},
    )
    driver.apply("cnn", {real_node.name: spec})

    def ready() -> bool:
        observed = driver.observe("cnn", [real_node.name])[real_node.name]
        assert observed.phase != "Failed", f"{observed}\n{_pod_events(core, namespace)}"
        return observed.phase == "Ready"

    eventually(ready, what="the inference pod Ready", timeout_s=POD_TIMEOUT_S)
    (pod,) = core.list_namespaced_pod(namespace).items
    assert pod.spec.node_name == real_node.name
    (status,) = pod.status.container_statuses
    assert status.ready
    assert status.restart_count == 0
    assert status.image_id  # containerd's digest of the imported image

    # A real request, to the pod's own address on the node's bridge.
    pod_ip = pod.status.pod_ip
    assert ipaddress.ip_address(pod_ip) in real_node.subnet
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with httpx.Client(base_url=f"http://{pod_ip}:{PORT}", timeout=30) as http:
        resp = http.post("/v1/infer", json={"inputs": {"image": x.tolist()}})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert (answer["model"], answer["version"]) == ("cnn", "1")
    got = np.asarray(answer["outputs"]["probabilities"], dtype=np.float32)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"image": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # The API server reaches the kubelet for the container's log.
    log = core.read_namespaced_pod_log(pod.metadata.name, namespace)
    assert "found in the cache" in log

    # The kernel holds the limits the spec asked for.
    uid, container_id = pod.metadata.uid, status.container_id
    memory = real_node.container_cgroup("memory", uid, container_id)
    assert int((memory / "memory.limit_in_bytes").read_text()) == 256 * 2**20
    cpu = real_node.container_cgroup("cpu", uid, container_id)
    quota = int((cpu / "cpu.cfs_quota_us").read_text())
    period = int((cpu / "cpu.cfs_period_us").read_text())
    assert quota / period == pytest.approx(0.5)
    assert int((cpu / "cpu.shares").read_text()) == 102  # 100m of 1024 shares per core
    assert "burstable" in str(real_node.pod_cgroup("memory", uid))


def test_a_pod_over_its_memory_limit_is_oom_killed(
    real_node: Node, shipped_images: dict[str, BuiltImage], core: Any, namespace: str
) -> None:
    hog = "import time\nheld = b'x' * (200 << 20)\ntime.sleep(60)\n"
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "hog"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "hog",
                        "image": shipped_images["inference"].ref,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", hog],
                        "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}},
                    }
                ],
            },
        },
    )

    def terminated() -> Any:
        pod = core.read_namespaced_pod("hog", namespace)
        for cs in pod.status.container_statuses or []:
            if cs.state.terminated is not None:
                return pod, cs.state.terminated
            waiting = cs.state.waiting
            assert waiting is None or waiting.reason == "ContainerCreating", (
                f"{waiting}\n{_pod_events(core, namespace)}"
            )
        return None

    _, state = eventually(terminated, what="the hog to be killed", timeout_s=POD_TIMEOUT_S)
    assert (state.reason, state.exit_code) == ("OOMKilled", 137)
    eventually(
        lambda: core.read_namespaced_pod("hog", namespace).status.phase == "Failed",
        what="the hog's pod Failed",
    )
