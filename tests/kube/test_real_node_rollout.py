"""Issue #15's end to end on a real kubelet: the production steps, on one node.

A controller (uvicorn, Postgres) and a real Celery worker are served on the host's
address on the node's bridge (the only host address its pods reach). The agent chart is
installed by Helm's own install action into the node's API server, the agent image built
from docker/agent.Dockerfile preloaded; the controller's Cluster uses the token of the
ServiceAccount the chart creates for it. A model is pushed and a Rollout with CPU and
memory limits applied: the worker's driver applies the DaemonSet, the kubelet starts the
inference image, which downloads the artifact from the controller and serves; real
requests go to the pod; the agent pod finds it through the API server, scrapes its
/metrics and heartbeats to the controller, and the gate passes on those numbers. Then a
version whose model does not fit the same memory limit: the kernel OOM-kills it, the gate
fails, and the rollback leaves the node as it was, the previous version's pod serving on,
never restarted."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s
from pydantic import SecretStr

from controller.api.app import create_app
from controller.kube.objects import APP_NAME, CACHE_DIR
from controller.manifests import builders
from controller.registry import samples
from controller.settings import Settings
from controller.tasks.celery_app import configure
from node_agent.cluster.handover import node_label
from tests.conftest import bearer
from tests.deploy.kube import installed
from tests.e2e.test_fleet_loopback import Traffic, gate_results, wait_until
from tests.kube.controlplane import ControlPlane
from tests.kube.kubelet import eventually
from tests.kube.node import BuiltImage, Node
from tests.kube.test_real_node import _pod_events
from tests.kube.test_rollout_engine import cluster_manifest
from tests.live import free_port, live_controller
from tests.rollouts.helpers import apply
from tests.tasks.test_worker import worker

pytestmark = pytest.mark.kube

CLUSTER = "edge-real"
JOIN = f"join-{uuid.uuid4().hex}"
PORT = 8500
INFERENCE_PODS = f"app.kubernetes.io/name={APP_NAME}"
AGENT_PODS = "app.kubernetes.io/name=edgefleet-agent"
# Both versions get the same limits: the second one's model does not fit in this memory.
MEMORY_LIMIT = 192 * 2**20
RESOURCES = {
    "requests": {"cpu": "100m", "memory": "64Mi"},
    "limits": {"cpu": "500m", "memory": "192Mi"},
}
SMALL = samples.build_cnn(seed=5)
# About 75 MB of weights (the second convolution's, 2 x 1024 x 1024 x 3 x 3 float32): more
# than the limit leaves beside the server itself once onnxruntime holds them.
LARGE = samples.build_cnn(seed=6, channels=1024, size=8)


@dataclass
class Stack:
    """An admin client of the controller the pods reach, and the cluster with the agent
    chart installed."""

    http: httpx.Client
    namespace: str  # the workloads'
    release_namespace: str  # the agent's
    core: Any
    apps: Any
    node: Node


@pytest.fixture
def stack(
    settings: Settings,
    committed: None,
    redis_available: None,
    real_node: Node,
    node_control_plane: ControlPlane,
    shipped_images: dict[str, BuiltImage],
    tmp_path: Path,
) -> Iterator[Stack]:
    host = str(real_node.gateway)
    port = free_port(host)
    url = f"http://{host}:{port}"
    inference = shipped_images["inference"].ref
    live = settings.model_copy(
        update={
            "public_url": url,
            "agent_join_token": SecretStr(JOIN),
            "inference_image": inference,
            "tasks_eager": False,
        }
    )
    namespace = f"ef-work-{uuid.uuid4().hex[:6]}"
    release_namespace = f"ef-agent-{uuid.uuid4().hex[:6]}"
    cp = node_control_plane
    core: Any = k8s.CoreV1Api(cp.api_client())
    apps: Any = k8s.AppsV1Api(cp.api_client())
    repository, _, tag = shipped_images["agent"].ref.rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "controller": {"url": url, "clusterName": CLUSTER},
        "joinToken": {"existingSecret": "", "value": JOIN},
        "discovery": {"refreshSeconds": 2},
        "rbac": {"workloadNamespace": namespace},
        "extraEnv": [
            {"name": "EDGEFLEET_HEARTBEAT_INTERVAL_S", "value": "1"},
            {"name": "EDGEFLEET_RETRY_MAX_S", "value": "2"},
        ],
    }
    configure(live)  # the API queues its tasks for the worker
    try:
        with (
            worker(
                tmp_path / "worker.log",
                EDGEFLEET_PUBLIC_URL=url,
                EDGEFLEET_INFERENCE_IMAGE=inference,
                EDGEFLEET_RECONCILE_INTERVAL_S="0.5",
            ),
            live_controller(create_app(live), port=port, host=host),
            httpx.Client(base_url=url, timeout=60, headers=bearer("admin")) as http,
            installed(
                "edgefleet-agent",
                values,
                release="edgefleet-agent",
                namespace=release_namespace,
                server=cp.server,
                token=cp.token,
                ca_file=cp.ca_cert_path,
            ),
        ):
            yield Stack(http, namespace, release_namespace, core, apps, real_node)
    finally:
        configure(settings)
        for ns in (namespace, release_namespace):  # the chart keeps the workload namespace
            core.delete_namespace(ns)


def pods(stack: Stack, namespace: str, selector: str) -> list[Any]:
    """The pods not being deleted, oldest first."""
    items = stack.core.list_namespaced_pod(namespace, label_selector=selector).items
    return sorted(
        (p for p in items if p.metadata.deletion_timestamp is None),
        key=lambda p: p.metadata.creation_timestamp,
    )


class PodTargets:
    """For Traffic: the inference pods running now, by address (listed at most every
    half second); client ``i`` calls the ``i``-th, modulo their number."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.urls: list[str] = []
        self.listed_at = 0.0

    def target(self, i: int) -> Callable[[], str | None]:
        def url() -> str | None:
            if time.monotonic() - self.listed_at > 0.5:
                self.listed_at = time.monotonic()
                self.urls = [
                    f"http://{p.status.pod_ip}:{PORT}"
                    for p in pods(self.stack, self.stack.namespace, INFERENCE_PODS)
                    if p.status.pod_ip and p.status.phase == "Running"
                ]
            return self.urls[i % len(self.urls)] if self.urls else None

        return url


def controller_token(stack: Stack) -> str:
    """The token Kubernetes put in the chart's Secret for the controller's ServiceAccount."""
    (secret,) = [
        s
        for s in stack.core.list_namespaced_secret(stack.release_namespace).items
        if s.metadata.name.endswith("-controller-token")
    ]

    def token() -> str | None:
        read = stack.core.read_namespaced_secret(secret.metadata.name, stack.release_namespace)
        return (read.data or {}).get("token")

    return base64.b64decode(eventually(token, what="the controller's token")).decode()


def push(http: httpx.Client, version: str, data: bytes) -> None:
    resp = http.post(
        "/v1/models/detector/versions",
        data={"version": version},
        files={"file": ("m.onnx", data, "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text


def validated(http: httpx.Client, version: str) -> bool:
    status = http.get(f"/v1/models/detector/versions/{version}").json()["status"]
    assert status != "Failed", f"{version} failed validation"
    return bool(status == "Ready")


def rollout(name: str, version: str) -> dict[str, Any]:
    return builders.rollout(
        name,
        version,
        selector={"matchLabels": {"edgefleet.io/real-node": "true"}},
        resources=RESOURCES,
        strategy={"steps": [{"nodes": 1, "bake": "3s"}], "progressDeadline": "120s"},
        gates={"maxErrorRate": 0.05, "minSamples": 20, "minHealthyRatio": 1.0},
    )


def phase_of(http: httpx.Client, name: str) -> str:
    phase: str = http.get(f"/v1/rollouts/{name}").json()["phase"]
    return phase


def events(http: httpx.Client, name: str, reason: str) -> list[dict[str, Any]]:
    found = http.get(f"/v1/rollouts/{name}/events", params={"limit": 200}).json()
    return [e for e in found if e["reason"] == reason]


def story(stack: Stack, name: str) -> str:
    """The rollout's events, oldest first, then the workload namespace's events and logs."""
    found = stack.http.get(f"/v1/rollouts/{name}/events", params={"limit": 200}).json()
    lines = [f"{e['reason']}: {e['message']} {e['data'].get('gate') or ''}" for e in found]
    return "\n".join(["", *reversed(lines), _pod_events(stack.core, stack.namespace)])


def settle(stack: Stack, name: str, timeout_s: float = 150) -> str:
    wait_until(
        lambda: phase_of(stack.http, name) not in ("Pending", "Progressing"),
        timeout_s,
        lambda: f"{name} still {phase_of(stack.http, name)}: {story(stack, name)}",
        poll_s=0.5,
    )
    return phase_of(stack.http, name)


def node_state(stack: Stack) -> dict[str, Any]:
    """What serves on the node: each inference pod (uid, version, restarts), the
    DaemonSets, the node's model label."""
    return {
        "pods": [
            (
                p.metadata.uid,
                p.metadata.labels["edgefleet.io/version"],
                sum(s.restart_count for s in p.status.container_statuses or []),
            )
            for p in pods(stack, stack.namespace, INFERENCE_PODS)
        ],
        "daemonsets": sorted(
            d.metadata.name for d in stack.apps.list_namespaced_daemon_set(stack.namespace).items
        ),
        "label": stack.core.read_node(stack.node.name).metadata.labels.get(node_label("detector")),
    }


def test_a_rollout_on_the_real_node_passes_its_gate_and_an_oom_killed_one_rolls_back(
    stack: Stack, node_control_plane: ControlPlane, shipped_images: dict[str, BuiltImage]
) -> None:
    http, node = stack.http, stack.node
    # The agent chart, installed by Helm (which waited for its DaemonSet): the agent pod
    # runs the built image on the node.
    (agent,) = pods(stack, stack.release_namespace, AGENT_PODS)
    assert agent.spec.node_name == node.name
    (agent_container,) = agent.status.container_statuses
    assert agent_container.ready
    assert agent_container.image == shipped_images["agent"].ref

    # The Cluster, with the identity the chart made for the controller and nothing more.
    cluster = cluster_manifest(CLUSTER, node_control_plane, stack.namespace)
    cluster["spec"]["credentials"]["token"] = controller_token(stack)
    resp = apply(http, cluster)
    assert resp.status_code == 200, resp.text
    push(http, "1.0.0", SMALL)
    push(http, "2.0.0", LARGE)

    # The agent enrols as the node the Cluster lists, and heartbeats.
    def heartbeat() -> list[Any]:
        items = http.get("/v1/nodes", params={"cluster": CLUSTER}).json()["items"]
        return [n for n in items if n["name"] == node.name and n["last_heartbeat_at"]]

    eventually(heartbeat, timeout_s=60, what="the agent pod's first heartbeat")
    wait_until(lambda: validated(http, "1.0.0"), 120, lambda: "1.0.0 never validated")

    targets = PodTargets(stack)
    traffic = Traffic([targets.target(0), targets.target(1)])
    try:
        assert apply(http, rollout("small", "1.0.0")).status_code == 200
        assert settle(stack, "small") == "Succeeded", story(stack, "small")
        (passed,) = [d["gate"] for d in gate_results(http, "small", "GatePassed")]
        assert (passed["nodes"], passed["healthy"]) == (1, 1), passed
        assert passed["max_p95_ms"] > 0  # measured by the agent, on the node
        assert traffic.sent >= 20

        (pod,) = pods(stack, stack.namespace, INFERENCE_PODS)
        assert pod.spec.node_name == node.name
        (status,) = pod.status.container_statuses
        assert status.ready
        assert status.restart_count == 0
        assert status.image == shipped_images["inference"].ref
        # The artifact came from the controller (the only server the pod reaches), into
        # the node's cache.
        sha = hashlib.sha256(SMALL).hexdigest()
        cache = node.host_dir / Path(CACHE_DIR).relative_to("/var/lib")
        assert (cache / "sha256" / sha[:2] / sha).read_bytes() == SMALL
        log = stack.core.read_namespaced_pod_log(pod.metadata.name, stack.namespace)
        assert f"artifact {sha} downloaded and verified" in log, log[-2000:]
        # The agent found it through the API server (the Service address the node relays).
        agent_log = stack.core.read_namespaced_pod_log(agent.metadata.name, stack.release_namespace)
        assert f"http://{pod.status.pod_ip}:{PORT}/metrics" in agent_log, agent_log[-2000:]
        # The kernel holds the Rollout's limits.
        uid, cid = pod.metadata.uid, status.container_id
        memory = node.container_cgroup("memory", uid, cid)
        assert int((memory / "memory.limit_in_bytes").read_text()) == MEMORY_LIMIT
        cpu = node.container_cgroup("cpu", uid, cid)
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        assert quota / int((cpu / "cpu.cfs_period_us").read_text()) == pytest.approx(0.5)

        before = node_state(stack)
        assert [version for _, version, _ in before["pods"]] == ["1.0.0"]
        assert before["label"] == "1.0.0"

        # The large model under the same limits: OOM-killed, the gate fails, rolled back.
        wait_until(lambda: validated(http, "2.0.0"), 120, lambda: "2.0.0 never validated")
        assert apply(http, rollout("large", "2.0.0")).status_code == 200
        assert settle(stack, "large") == "RolledBack", story(stack, "large")
        (failed,) = gate_results(http, "large", "GateFailed")
        assert failed["gate"]["unhealthy"] == 1, failed
        failures = events(http, "large", "WorkloadFailed")
        assert "OOMKilled" in str(failures), story(stack, "large")

        wait_until(
            lambda: node_state(stack) == before,
            60,
            lambda: f"the node as before the large version: {node_state(stack)} != {before}",
        )
        answered = traffic.sent
        wait_until(lambda: traffic.sent > answered, 10, lambda: "1.0.0 no longer answers")
    finally:
        traffic.close()
