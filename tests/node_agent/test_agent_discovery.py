"""How the agent finds inference servers: the pod list's reading, the refresh rules, and
the reader's difference between a server that was removed and one that fails. The same
code against a real API server: tests/kube/test_agent_discovery.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from node_agent.discovery import (
    DiscoveryError,
    PodDiscovery,
    api_url_from_env,
    metrics_url,
)
from node_agent.metrics_reader import MetricsReader
from tests.agents.fakes import FakeClock, FakeInferenceServer, inference_server

SHA1 = "1" * 64


def pod(
    ip: str | None = "10.42.0.7",
    *,
    phase: str = "Running",
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ef-cnn-1-abc123-x", "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-23T12:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "inference", "ports": ports or []}]},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


def test_metrics_url_of_a_pod() -> None:
    prom = {"prometheus.io/port": "8500", "prometheus.io/path": "/metrics"}
    assert metrics_url(pod(annotations=prom)) == "http://10.42.0.7:8500/metrics"
    # No annotations: the container port named http, and /metrics.
    http_port = [{"name": "grpc", "containerPort": 9000}, {"name": "http", "containerPort": 8501}]
    assert metrics_url(pod(ports=http_port)) == "http://10.42.0.7:8501/metrics"
    assert metrics_url(pod("fd00::7", annotations=prom)) == "http://[fd00::7]:8500/metrics"
    custom = {
        "prometheus.io/port": "9100",
        "prometheus.io/path": "m",
        "prometheus.io/scheme": "https",
    }
    assert metrics_url(pod(annotations=custom)) == "https://10.42.0.7:9100/m"
    # Not (or no longer) a server to scrape.
    assert metrics_url(pod(phase="Pending", annotations=prom)) is None
    assert metrics_url(pod(None, annotations=prom)) is None
    assert metrics_url(pod(deleting=True, annotations=prom)) is None
    assert metrics_url(pod()) is None  # no port anywhere
    assert metrics_url(pod(annotations={"prometheus.io/port": "http"})) is None


def test_api_url_from_the_pod_environment() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.43.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert api_url_from_env(env) == "https://10.43.0.1:443"
    assert api_url_from_env({"KUBERNETES_SERVICE_HOST": "fd00::1"}) == "https://[fd00::1]:443"
    assert api_url_from_env({}) is None


class FakeApi:
    """The pods endpoint of an API server; ``down`` makes it refuse connections."""

    def __init__(self) -> None:
        self.pods: list[dict[str, Any]] = []
        self.down = False
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.headers.get("Authorization") != "Bearer tok-1":
            return httpx.Response(401, json={"kind": "Status", "message": "Unauthorized"})
        return httpx.Response(200, json={"kind": "PodList", "items": self.pods})


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


def discovery(api: FakeApi, tmp_path: Path, clock: FakeClock) -> PodDiscovery:
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    return PodDiscovery(
        api_url="https://10.43.0.1:443",
        namespace="edgefleet-workloads",
        node_name="edge-1",
        token_file=token,
        ca_file=None,
        refresh_s=60,
        clock=clock.monotonic,
        transport=httpx.MockTransport(api.handle),
    )


def test_pod_list_request_and_refresh(api: FakeApi, tmp_path: Path) -> None:
    clock = FakeClock()
    d = discovery(api, tmp_path, clock)
    api.pods = [pod("10.42.0.7", annotations={"prometheus.io/port": "8500"})]
    assert d.urls() == ["http://10.42.0.7:8500/metrics"]
    (req,) = api.requests
    assert req.url.path == "/api/v1/namespaces/edgefleet-workloads/pods"
    assert dict(req.url.params) == {
        "fieldSelector": "spec.nodeName=edge-1",
        "labelSelector": "app.kubernetes.io/name=edgefleet-inference",
        "resourceVersion": "0",  # from the API server's cache, not a quorum read
    }
    # Within refresh_s: no new request; after it, or when asked, a new list.
    clock.advance(30)
    assert d.urls() == ["http://10.42.0.7:8500/metrics"]
    assert len(api.requests) == 1
    api.pods = []
    assert d.urls(refresh=True) == []
    clock.advance(61)
    d.urls()
    assert len(api.requests) == 3


def test_api_down_keeps_the_last_list(api: FakeApi, tmp_path: Path) -> None:
    clock = FakeClock()
    d = discovery(api, tmp_path, clock)
    api.pods = [pod("10.42.0.7", annotations={"prometheus.io/port": "8500"})]
    assert d.urls() == ["http://10.42.0.7:8500/metrics"]
    api.down = True
    clock.advance(61)
    assert d.urls() == ["http://10.42.0.7:8500/metrics"]
    # And it tries again at every call until the API answers.
    api.down = False
    api.pods = []
    assert d.urls() == []


def test_refused_list_names_the_status(api: FakeApi, tmp_path: Path) -> None:
    d = discovery(api, tmp_path, FakeClock())
    (tmp_path / "token").write_text("rotated-away")
    with pytest.raises(DiscoveryError, match="401 Unauthorized"):
        d.list_urls()
    (tmp_path / "token").unlink()
    with pytest.raises(DiscoveryError, match="cannot read the service account token"):
        d.list_urls()


class Switchable:
    """A Discovery whose answer the test sets."""

    dynamic = True

    def __init__(self, urls: list[str]) -> None:
        self.current = urls
        self.refreshes = 0

    def urls(self, *, refresh: bool = False) -> list[str]:
        self.refreshes += refresh
        return list(self.current)


@pytest.fixture
def server() -> Iterator[FakeInferenceServer]:
    with inference_server() as s:
        yield s


def test_a_removed_server_is_forgotten_a_failing_one_reported(
    server: FakeInferenceServer,
) -> None:
    clock = FakeClock()
    found = Switchable([server.url])
    with httpx.Client(timeout=2) as http:
        reader = MetricsReader(found, client=http, clock=clock.monotonic)
        server.set_model("cnn", "1", SHA1)
        assert [r.state for r in reader.read()] == ["Ready"]
        # Still listed but not answering: a failing workload (after one re-list).
        server.fail = True
        clock.advance(10)
        assert [(r.model, r.state) for r in reader.read()] == [("cnn", "Failed")]
        assert found.refreshes == 1
        # Gone from the list between two reads: forgotten, no report.
        found.current = []
        clock.advance(10)
        assert reader.read() == []
        # Back (a new pod at the same address): a fresh baseline, no stale window.
        server.fail = False
        found.current = [server.url]
        clock.advance(10)
        (back,) = reader.read()
        assert (back.state, back.metrics) == ("Ready", None)


def test_agent_settings_for_kubernetes_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = AgentSettings(
        controller_url="http://127.0.0.1:9",
        cluster="edge",
        node_name="edge-1",
        state_dir=tmp_path / "agent",
        discovery="kubernetes",
        kubernetes_ca_file=None,
    )
    with pytest.raises(DiscoveryError, match="EDGEFLEET_KUBERNETES_API_URL"):
        Agent(settings)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.43.0.1")
    with pytest.raises(DiscoveryError, match="no CA bundle"):
        Agent(settings.model_copy(update={"kubernetes_ca_file": tmp_path / "missing.crt"}))
    agent = Agent(settings)
    try:
        assert isinstance(agent.discovery, PodDiscovery)
        assert agent.discovery.namespace == "edgefleet-workloads"
    finally:
        agent.close()


def test_agent_discovery_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="discovery"):
        AgentSettings.model_validate(
            {"controller_url": "http://c", "cluster": "e", "node_name": "n", "discovery": "dns"}
        )
    assert json.dumps(AgentSettings.model_json_schema()["properties"]["discovery"]["enum"]) == (
        '["static", "kubernetes"]'
    )
