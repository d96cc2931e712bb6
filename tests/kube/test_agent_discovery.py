"""The agent finds its node's inference pods through a real API server, with exactly the
identity and permissions the agent chart gives it, and scrapes the real inference server
that the controller's DaemonSet describes.

The kubelet stand-in here goes one step further than marking pods Running: for the pod
on the agent's node it runs the pod's own container arguments (``edgefleet-serve`` with
the DaemonSet's ``args``), on a loopback address that plays the pod IP."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kubernetes import client as k8s

from controller.kube.client import KubernetesDriver
from controller.kube.driver import WorkloadSpec
from controller.registry import samples
from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from node_agent.discovery import DiscoveryError, PodDiscovery
from tests.deploy.kube import objects, render
from tests.kube.apply import ORDER, applied
from tests.kube.controlplane import ControlPlane, make_node
from tests.kube.kubelet import eventually, finalize_terminating_pods, settle
from tests.live import free_port
from tests.node_agent.test_serve_helpers import Origin

SERVE = Path(sys.executable).with_name("edgefleet-serve")
POD_IPS = ("127.0.0.2", "127.0.0.3")  # loopback addresses playing the two pods' IPs


def _namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _service_account_token(core: Any, namespace: str, name: str) -> str:
    """The token the token controller minted for the ServiceAccount (Kubernetes 1.20
    still creates a Secret per account; a kubelet would project one into the pod)."""

    def secret_name() -> str | None:
        sa = core.read_namespaced_service_account(name, namespace)
        return sa.secrets[0].name if sa.secrets else None

    found = eventually(secret_name, what=f"a token for {namespace}/{name}")
    secret = core.read_namespaced_secret(found, namespace)
    return base64.b64decode(secret.data["token"]).decode()


def _pod_on(core: Any, namespace: str, node: str) -> Any:
    pods = core.list_namespaced_pod(namespace, field_selector=f"spec.nodeName={node}").items
    return pods[0] if pods else None


def _run_container(pod: Any, *, host: str, cache_dir: Path) -> subprocess.Popen[bytes]:
    """What the kubelet would start: the container's own arguments, with the node-local
    cache under ``cache_dir`` and listening on ``host`` (the pod's IP)."""
    (container,) = pod.spec.containers
    args = list(container.args)
    args[args.index("--cache-dir") + 1] = str(cache_dir)
    return subprocess.Popen(
        [str(SERVE), *args, "--host", host],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def cnn() -> bytes:
    return samples.build_cnn()


@pytest.fixture
def release(control_plane: ControlPlane) -> Iterator[dict[str, str]]:
    """The agent chart installed: its ServiceAccount, its Role and binding, the workload
    namespace; returns the names and the agent's token."""
    release_ns = f"efsys-{uuid.uuid4().hex[:6]}"
    workloads = f"ef-{uuid.uuid4().hex[:8]}"
    rendered = objects(
        render(
            "edgefleet-agent",
            {"rbac": {"workloadNamespace": workloads}},
            release="agent",
            namespace=release_ns,
        )
    )
    chart_objects = [o for o in rendered if o["kind"] in ORDER]
    (daemonset,) = [o for o in rendered if o["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    api = control_plane.api_client()
    with applied(api, [_namespace(release_ns), *chart_objects]):
        core: Any = k8s.CoreV1Api(api)
        token = _service_account_token(core, release_ns, pod["serviceAccountName"])
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        yield {"workloads": workloads, "token": token, **env}


def test_agent_scrapes_the_inference_pod_on_its_own_node(
    control_plane: ControlPlane, release: dict[str, str], cnn: bytes, tmp_path: Path
) -> None:
    workloads = release["workloads"]
    assert release["EDGEFLEET_DISCOVERY"] == "kubernetes"
    assert release["EDGEFLEET_WORKLOAD_NAMESPACE"] == workloads
    token_file = tmp_path / "token"
    token_file.write_text(release["token"])
    core: Any = k8s.CoreV1Api(control_plane.api_client())
    nodes = [f"edge-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    for name in nodes:
        make_node(core, name, labels={"site": "lab"})
    port = free_port()
    ca = Path(control_plane.ca_cert_path) if control_plane.ca_cert_path else None
    driver = KubernetesDriver(
        "edge",
        server=control_plane.server,
        namespace=workloads,
        credentials={
            "token": control_plane.token,
            **({"caData": ca.read_text()} if ca else {"insecureSkipTLSVerify": True}),
        },
        image="ghcr.io/edgefleet/inference:test",
        port=port,
        backoff=(0.1, 0.2),
    )
    servers: list[subprocess.Popen[bytes]] = []
    agent: Agent | None = None
    with Origin() as origin:
        try:
            spec = WorkloadSpec(
                model="cnn",
                version="1",
                sha256=hashlib.sha256(cnn).hexdigest(),
                format="onnx",
                artifact_url=origin.add("/v1/models/cnn/versions/1/artifact", cnn),
                rollout="r",
                resources={},
            )
            driver.apply("cnn", dict.fromkeys(nodes, spec))

            def running() -> list[str] | None:
                pods = [_pod_on(core, workloads, n) for n in nodes]
                ok = all(p is not None and p.status.phase == "Running" for p in pods)
                return nodes if ok else None

            pods = eventually(
                running, what="a Running pod on each node", beat=lambda: settle(core, workloads)
            )
            for name, ip in zip(pods, POD_IPS, strict=True):
                pod = _pod_on(core, workloads, name)
                core.patch_namespaced_pod_status(
                    pod.metadata.name,
                    workloads,
                    {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
                )
            mine = _pod_on(core, workloads, nodes[0])
            servers.append(_run_container(mine, host=POD_IPS[0], cache_dir=tmp_path / "cache"))
            base = f"http://{POD_IPS[0]}:{port}"
            eventually(lambda: _ready(base), what="the inference server to turn ready")

            settings = AgentSettings(
                controller_url="http://127.0.0.1:9",  # not contacted: collect() only
                cluster="edge",
                node_name=nodes[0],
                state_dir=tmp_path / "agent",
                discovery="kubernetes",
                workload_namespace=workloads,
                kubernetes_api_url=control_plane.server,
                kubernetes_token_file=token_file,
                kubernetes_ca_file=ca,
            )
            agent = Agent(settings)
            # Its own node's pod only, on the port and path of the pod's annotations.
            # (resourceVersion=0 answers from the API server's watch cache, which may
            # lag the status patch above by a moment: what an agent sees next interval.)
            want = [f"{base}/metrics"]
            found = agent.discovery
            eventually(lambda: found.urls(refresh=True) == want, what="the pod's metrics URL")
            assert found.urls() == want

            agent.collect()  # the baseline of the first window
            x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
            with httpx.Client(base_url=base, timeout=10) as http:
                for _ in range(7):
                    resp = http.post("/v1/infer", json={"inputs": {"image": x.tolist()}})
                    assert resp.status_code == 200, resp.text
            agent.collect()
            beat = json.loads(agent.queue.peek(10)[-1].body)
            (workload,) = beat["workloads"]
            assert (workload["model"], workload["version"]) == ("cnn", "1")
            assert workload["sha256"] == spec.sha256
            assert workload["state"] == "Ready"
            assert workload["metrics"]["samples"] == 7
            assert workload["metrics"]["errors"] == 0

            # The agent's identity reads pods where the workloads run, and nowhere else.
            elsewhere = PodDiscovery(
                api_url=control_plane.server,
                namespace="default",
                node_name=nodes[0],
                token_file=token_file,
                ca_file=ca,
                clock=lambda: 0.0,
            )
            with pytest.raises(DiscoveryError, match="403"):
                elsewhere.list_urls()
            elsewhere.close()

            # The node leaves the model (a wave moved it, or undo): the pod goes, the
            # server stops, and the agent forgets it instead of reporting a failure.
            driver.apply("cnn", {nodes[0]: None})
            eventually(
                lambda: _pod_on(core, workloads, nodes[0]) is None,
                what="the pod on the first node to go",
                beat=lambda: finalize_terminating_pods(core, workloads),
            )
            servers[0].terminate()
            servers[0].wait(15)
            agent.collect()
            beat = json.loads(agent.queue.peek(10)[-1].body)
            assert beat.get("workloads", []) == []
            eventually(lambda: found.urls(refresh=True) == [], what="the pod to be unlisted")
        finally:
            for proc in servers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            if agent is not None:
                agent.close()
            driver.apply("cnn", dict.fromkeys(nodes))
            driver.close()
            for name in nodes:
                core.delete_node(name)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
