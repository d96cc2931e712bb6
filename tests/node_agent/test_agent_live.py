"""The agent against the real controller: uvicorn on Postgres, with the test's rolled-back
connection (tests/conftest.py), a controller that is stopped and started again, and
local inference servers whose /metrics the agent reads."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select

from controller.db.models import Assignment, AssignmentState, ModelVersion, Node
from controller.db.session import session_scope
from controller.settings import Settings
from node_agent.agent.client import ControllerClient
from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from tests.agents.fakes import (
    JOIN_TOKEN,
    FakeClock,
    FakeInferenceServer,
    LiveController,
    inference_server,
)
from tests.rollouts import helpers
from tests.rollouts.helpers import apply, drive, push_versions, rollout_doc


class RecordingTransport(httpx.HTTPTransport):
    """Remembers the sequence numbers of every heartbeat request that reached the
    controller."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[list[int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)  # raises when the controller is down
        if request.url.path.endswith("/heartbeat"):
            self.sent.append([b["seq"] for b in json.loads(request.content)])
        return response


def make_agent(
    url: str, state_dir: Path, node: str, *, clock: Any = None, **settings: Any
) -> tuple[Agent, RecordingTransport]:
    transport = RecordingTransport()
    values: dict[str, Any] = {
        "controller_url": url,
        "join_token": JOIN_TOKEN,
        "node_name": node,
        "cluster": "edge",
        "state_dir": state_dir,
        "heartbeat_interval_s": 10.0,
        **settings,
    }
    client = ControllerClient(url, transport=transport)
    extra = {"clock": clock} if clock is not None else {}
    return Agent(AgentSettings(**values), client=client, **extra), transport


def node_row(name: str) -> Node:
    with session_scope() as s:
        node = s.scalar(select(Node).where(Node.name == name))
        assert node is not None
        s.expunge(node)
        return node


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("edgefleet_heartbeats_total", {"result": result}) or 0.0


def test_enrol_and_report(live: LiveController, edge: TestClient, tmp_path: Path) -> None:
    with inference_server() as inference:
        inference.set_model("detector", "1.0.0", "a" * 64)
        agent, _ = make_agent(live.url, tmp_path / "n0", "edge-n0", inference_urls=[inference.url])
        try:
            agent.cycle()
            credential = tmp_path / "n0" / "credential"
            assert stat.S_IMODE(credential.stat().st_mode) == 0o600
            node = node_row("edge-n0")
            assert node.credential_hash is not None
            assert credential.read_text() not in node.credential_hash
            assert (node.last_seq, node.health) == (1, "Ready")
            assert node.last_heartbeat_at is not None
            agent.cycle()
            assert node_row("edge-n0").last_seq == 2
            assert inference.scrapes == 2
            assert (agent.stats.accepted, len(agent.queue)) == (2, 0)
        finally:
            agent.close()


def test_impersonation_is_refused(live: LiveController, edge: TestClient, tmp_path: Path) -> None:
    honest, _ = make_agent(live.url, tmp_path / "state", "edge-n0")
    honest.cycle()
    honest.close()
    # Same state directory (edge-n0's credential), configured as another node.
    liar, _ = make_agent(live.url, tmp_path / "state", "edge-n1")
    try:
        liar.cycle()
        assert liar.stats.failures == 1
        assert len(liar.queue) == 1  # kept: an operator may fix the name
        assert node_row("edge-n1").last_seq == 0
        assert node_row("edge-n1").last_heartbeat_at is None
        assert node_row("edge-n0").last_seq == 1
    finally:
        liar.close()


def test_controller_down_for_an_hour_then_back(
    live: LiveController, edge: TestClient, tmp_path: Path
) -> None:
    clock = FakeClock()
    accepted_before, duplicates_before = counted("accepted"), counted("duplicate")
    agent, transport = make_agent(live.url, tmp_path / "n2", "edge-n2", clock=clock)
    try:
        for _ in range(5):
            agent.cycle()
            clock.advance(10)
        assert node_row("edge-n2").last_seq == 5

        live.stop()
        for _ in range(360):  # an hour at 10 s
            agent.cycle()
            clock.advance(10)
        assert len(agent.queue) == 360
        assert node_row("edge-n2").last_seq == 5

        live.start()
        cycles = 0
        while len(agent.queue) and cycles < 7:  # the longest retry wait is 60 s
            agent.cycle()
            clock.advance(10)
            cycles += 1
        total = 365 + cycles
        assert len(agent.queue) == 0
        assert node_row("edge-n2").last_seq == total
        assert (agent.stats.accepted, agent.stats.duplicates) == (total, 0)
        assert counted("accepted") - accepted_before == total
        assert counted("duplicate") - duplicates_before == 0
        sent = [seq for batch in transport.sent for seq in batch]
        assert sent == list(range(1, total + 1))  # in order, each once
        assert max(len(b) for b in transport.sent) == 360 + cycles  # one replay request
    finally:
        agent.close()

    # A restart keeps counting from where it was.
    again, _ = make_agent(live.url, tmp_path / "n2", "edge-n2", clock=clock)
    try:
        again.cycle()
        assert node_row("edge-n2").last_seq == total + 1
    finally:
        again.close()


def test_gates_read_the_numbers_agents_report(
    live: LiveController,
    edge: TestClient,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every node runs an agent and a local inference server; the rollout's gates see
    the p95 the agents computed from the servers' latency histograms."""
    push_versions(edge, "1.0.0")
    nodes = ["edge-n0", "edge-n1", "edge-n2"]
    servers = {n: FakeInferenceServer() for n in nodes}
    agents = {
        n: make_agent(live.url, tmp_path / n, n, inference_urls=[servers[n].url])[0] for n in nodes
    }

    def report(*_args: Any, **_kwargs: Any) -> int:
        """Instead of ingesting directly: each node whose workload runs serves traffic,
        then every agent runs one cycle against the live controller."""
        with session_scope() as s:
            rows = s.execute(
                select(Node.name, ModelVersion.version, ModelVersion.sha256)
                .join(Assignment, Assignment.node_id == Node.id)
                .join(ModelVersion, ModelVersion.id == Assignment.observed_version_id)
                .where(Assignment.state.in_([AssignmentState.RUNNING, AssignmentState.HEALTHY]))
            ).all()
        for node, version, sha in rows:
            server = servers[node]
            if not server.has_model:
                server.set_model("detector", version, sha)
            server.serve(30, 0.012)  # all in the (10 ms, 25 ms] bucket
        for agent in agents.values():
            agent.cycle()
        return len(rows)

    monkeypatch.setattr(helpers, "report", report)
    try:
        assert apply(edge, rollout_doc("live", "1.0.0")).status_code == 200
        assert drive("live", settings)[-1] == "Succeeded"
    finally:
        for agent in agents.values():
            agent.close()
        for server in servers.values():
            server.close()
    events = edge.get("/v1/rollouts/live/events", params={"limit": 1000}).json()
    gates = [e["data"]["gate"] for e in events if e["reason"] == "GatePassed"]
    assert gates
    # p95 of 30 samples in (10, 25] ms, interpolated: 10 + 15 * 28.5 / 30.
    assert {g["max_p95_ms"] for g in gates} == {24.25}
    with session_scope() as s:
        metrics = s.scalars(select(Assignment.metrics)).all()
    assert {(m["samples"], m["errors"], m["p95_ms"], m["state"]) for m in metrics} == {
        (30, 0, 24.25, "Ready")
    }
