"""A real kubelet runs the shipped inference image: the pod the controller's driver
describes starts from the image built from docker/inference.Dockerfile, serves a real
model and answers a real inference request; its cgroup limits are the ones its spec
asked for; a pod over its memory limit is OOMKilled by the kernel, as the API server
reports it.

The artifact comes from the node-local cache that the DaemonSet mounts (a hostPath),
filled beforehand with the verified bytes, as a node that served the version before has
it; or it is downloaded, with the cluster's artifact token, from a server of the test
bound to the host's address on the pods' bridge (the only host address they reach)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controller.kube.client import KubernetesDriver
from controller.kube.driver import WorkloadSpec
from controller.kube.objects import CACHE_DIR, RUN_AS
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
    # The API server's admission refuses a bare pod (500, "No API token found for service
    # account default") until the controller-manager has created the namespace's default
    # ServiceAccount and its token Secret (v1.20 mounts a Secret's token); a Deployment's
    # ReplicaSet retries on its own, a test's pod does not.
    eventually(
        lambda: [
            sa
            for sa in core.list_namespaced_service_account(name).items
            if sa.metadata.name == "default" and sa.secrets
        ],
        timeout_s=30,
        what=f"the default ServiceAccount of {name}",
    )
    yield name
    core.delete_namespace(name)


def _pod_events(core: Any, namespace: str) -> str:
    """The namespace's events and its containers' last log lines, for a failure message."""
    events = core.list_namespaced_event(namespace).items
    lines = [f"  {e.involved_object.name}: {e.reason}: {e.message}" for e in events]
    for pod in core.list_namespaced_pod(namespace).items:
        for status in pod.status.container_statuses or []:
            previous = status.restart_count > 0
            try:
                log = core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container=status.name, previous=previous
                )
            except ApiException as exc:
                log = f"<no log: {exc.reason}>"
            tail = "\n".join(f"    {line}" for line in log.splitlines()[-15:])
            lines.append(f"  log of {pod.metadata.name}/{status.name}:\n{tail}")
    return "\n".join(lines)


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
    cache = real_node.host_dir / Path(CACHE_DIR).relative_to("/var/lib")
    cached = cache / "sha256" / sha[:2] / sha
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(model)
    for path in (cache, *cache.rglob("*")):  # written by that pod: the server's uid
        os.chown(path, RUN_AS, RUN_AS)

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


class _ArtifactOrigin:
    """The controller's artifact endpoint, reduced: one file, behind a bearer token."""

    def __init__(self, host: str, data: bytes, token: str) -> None:
        self.authorizations: list[str | None] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                origin.authorizations.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_error(401)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def test_a_pod_downloads_its_artifact_into_the_node_cache(
    real_node: Node,
    node_control_plane: ControlPlane,
    shipped_images: dict[str, BuiltImage],
    core: Any,
    namespace: str,
) -> None:
    """No pod made the cache yet or a root-owned one is there (the kubelet creates a
    hostPath directory as root): the server, uid 10001, still writes its first download
    there (the DaemonSet's model-cache-owner init container), authenticated with the
    token of the driver's Secret."""
    model = samples.build_cnn(classes=4, seed=7)
    sha = hashlib.sha256(model).hexdigest()
    token = f"artifact-{uuid.uuid4().hex}"
    cache = real_node.host_dir / Path(CACHE_DIR).relative_to("/var/lib")
    if cache.exists():  # else the kubelet creates it, owned by root
        os.chown(cache, 0, 0)
    origin = _ArtifactOrigin(str(real_node.gateway), model, token)
    cp = node_control_plane
    assert cp.ca_cert_path
    try:
        driver = KubernetesDriver(
            "real",
            server=cp.server,
            namespace=namespace,
            credentials={"token": cp.token, "caData": Path(cp.ca_cert_path).read_text()},
            image=shipped_images["inference"].ref,
            port=PORT,
            artifact_token=lambda: token,
        )
        driver.check()
        spec = WorkloadSpec(
            model="small",
            version="2",
            sha256=sha,
            format="onnx",
            artifact_url=f"{origin.url}/v1/models/small/versions/2/artifact",
            rollout="real-node",
            resources={"limits": LIMITS},
        )
        driver.apply("small", {real_node.name: spec})

        def ready() -> bool:
            observed = driver.observe("small", [real_node.name])[real_node.name]
            assert observed.phase != "Failed", f"{observed}\n{_pod_events(core, namespace)}"
            return observed.phase == "Ready"

        eventually(ready, what="the downloading pod Ready", timeout_s=POD_TIMEOUT_S)
    finally:
        origin.close()
    assert origin.authorizations == [f"Bearer {token}"]  # one download, with the token
    assert (cache / "sha256" / sha[:2] / sha).read_bytes() == model
    assert (cache.stat().st_uid, cache.stat().st_gid) == (RUN_AS, RUN_AS)
    (pod,) = core.list_namespaced_pod(namespace).items
    (init,) = pod.status.init_container_statuses
    assert (init.name, init.state.terminated.exit_code) == ("model-cache-owner", 0)
