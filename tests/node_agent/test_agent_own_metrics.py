"""The agent's own /metrics (node_agent/agent/metrics.py), scraped over HTTP while its
real loop runs against the real controller (uvicorn on Postgres), which is stopped for
ten minutes and started again: the counters must say what the controller stored and
what went over the wire."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from node_agent.agent.client import ControllerClient
from node_agent.agent.loop import Agent
from node_agent.agent.metrics import AgentMetrics, MetricsServer
from node_agent.agent.settings import AgentSettings
from tests.agents.fakes import JOIN_TOKEN, FakeClock, LiveController
from tests.live import free_port
from tests.node_agent.test_agent_live import node_row


class Wire(httpx.HTTPTransport):
    """What went over the wire: each heartbeat request the controller answered (its
    sequence numbers, and the agent's clock then), and each that got no answer."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.answered: list[tuple[list[int], datetime]] = []
        self.unanswered = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        heartbeat = request.url.path.endswith("/heartbeat")
        try:
            response = super().handle_request(request)
        except httpx.TransportError:
            self.unanswered += heartbeat
            raise
        if heartbeat and response.status_code == 200:
            seqs = [int(b["seq"]) for b in httpx.Response(200, content=request.content).json()]
            self.answered.append((seqs, self.clock.now()))
        return response


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(url, timeout=5)
    assert resp.status_code == 200, resp.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def stored(result: str) -> float:
    """The controller's own count of heartbeats it stored (same process: uvicorn runs
    in a thread of the test)."""
    return REGISTRY.get_sample_value("edgefleet_heartbeats_total", {"result": result}) or 0.0


def test_the_agents_metrics_follow_an_outage_and_its_replay(
    live: LiveController, edge: TestClient, tmp_path: Path
) -> None:
    clock = FakeClock()
    wire = Wire(clock)
    port = free_port()
    settings: dict[str, Any] = {
        "controller_url": live.url,
        "join_token": JOIN_TOKEN,
        "node_name": "edge-n1",
        "cluster": "edge",
        "state_dir": tmp_path / "agent",
        "heartbeat_interval_s": 10.0,
        "metrics_port": port,
    }
    stored_before = stored("accepted")
    agent = Agent(
        AgentSettings(**settings), client=ControllerClient(live.url, transport=wire), clock=clock
    )
    url = f"http://127.0.0.1:{port}/metrics"
    during: dict[str, Any] = {}

    def in_the_outage() -> None:
        during["samples"] = scrape(url)
        during["cycles"] = len(clock.waits)  # one wait after each cycle
        during["stored_seq"] = node_row("edge-n1").last_seq
        during["unanswered"] = wire.unanswered
        during["last_answer"] = wire.answered[-1][1]

    start = clock.monotonic()
    clock.at(start + 45, live.stop)  # after five beats
    clock.at(start + 645, in_the_outage)
    clock.at(start + 945, live.start)  # down for 15 minutes
    clock.stop_at = start + 1245  # then 5 minutes more (the retry wait is at most 60 s)
    try:
        agent.run(threading.Event())
        after = scrape(url)
        left = len(agent.queue)
    finally:
        agent.close()

    # In the outage: what was built and not stored waits in the outbox; every request
    # that got no answer is a failure; the last success is the last answered request.
    d = during["samples"]
    assert during["stored_seq"] == 5
    assert value(d, "edgefleet_agent_heartbeats_queued") == during["cycles"] - 5 > 50
    assert value(d, "edgefleet_agent_heartbeats_sent_total") == 5
    assert value(d, "edgefleet_agent_heartbeats_replayed_total") == 0
    unreachable = value(d, "edgefleet_agent_heartbeat_failures_total", reason="unreachable")
    assert unreachable == during["unanswered"] > 0
    last = value(d, "edgefleet_agent_last_heartbeat_timestamp_seconds")
    assert last == during["last_answer"].timestamp()

    # After the replay: sent is what the controller stored, each once; replayed is each
    # heartbeat that reached it beside a newer one (in the same request).
    node = node_row("edge-n1")
    assert value(after, "edgefleet_agent_heartbeats_queued") == left == 0
    assert value(after, "edgefleet_agent_heartbeats_sent_total") == node.last_seq
    assert stored("accepted") - stored_before == node.last_seq
    sent = [seq for seqs, _ in wire.answered for seq in seqs]
    assert sent == list(range(1, node.last_seq + 1))
    replayed = sum(len(seqs) - 1 for seqs, _ in wire.answered)
    assert value(after, "edgefleet_agent_heartbeats_replayed_total") == replayed
    assert replayed >= 90  # the fifteen minutes of the outage
    failures = {
        dict(labels)["reason"]: v
        for (name, labels), v in after.items()
        if name == "edgefleet_agent_heartbeat_failures_total"
    }
    assert failures == {
        "unreachable": wire.unanswered,
        "unauthorized": 0,
        "too_large": 0,
        "invalid": 0,
        "refused": 0,
    }
    assert value(after, "edgefleet_agent_heartbeats_dropped") == 0
    last = value(after, "edgefleet_agent_last_heartbeat_timestamp_seconds")
    assert last == wire.answered[-1][1].timestamp() > during["last_answer"].timestamp()


def test_only_metrics_is_served_on_ipv4_and_ipv6() -> None:
    """On the address given (the chart's pod IP may be IPv6), GET /metrics only."""
    metrics = AgentMetrics()
    metrics.sent.inc(3)
    for host in ("127.0.0.1", "::1"):
        server = MetricsServer(metrics.registry, host, 0)
        try:
            base = f"http://{'[::1]' if ':' in host else host}:{server.port}"
            assert value(scrape(f"{base}/metrics"), "edgefleet_agent_heartbeats_sent_total") == 3
            assert httpx.get(f"{base}/", timeout=5).status_code == 404
            assert httpx.post(f"{base}/metrics", timeout=5).status_code == 501
        finally:
            server.close()
