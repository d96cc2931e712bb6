"""Silence detection end to end on one fake timeline: a real agent (node_agent code, its
own loop on a FakeClock) beats to the real controller (uvicorn on Postgres), whose
heartbeat arrival time is read from the same clock; the agent stops; mark_silent_nodes,
at injected times, turns its node Stale then Offline exactly at the configured silences
and not a moment before; a rollout then defers the node."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.agents import service as agents_service
from controller.db.base import utcnow
from controller.db.models import Node
from controller.db.session import session_scope
from controller.fleet import service as fleet_service
from controller.settings import Settings
from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from tests.agents.fakes import JOIN_TOKEN, FakeClock, LiveController
from tests.rollouts.helpers import (
    apply,
    drive,
    node_states,
    push_versions,
    rollout_doc,
    running_versions,
)

INTERVAL_S = 10.0
# Postgres keeps microseconds: one millisecond is well past the boundary, either side.
TICK = timedelta(milliseconds=1)


def node(name: str) -> Node:
    with session_scope() as s:
        row = s.scalar(select(Node).where(Node.name == name))
        assert row is not None
        s.expunge(row)
        return row


def mark_silent(settings: Settings, at: datetime) -> str:
    """Silence detection as of ``at``; edge-n0's health after it."""
    with session_scope() as s:
        fleet_service.mark_silent_nodes(s, settings, now=at)
    return node("edge-n0").health


def test_an_agent_that_stops_beating_is_marked_silent_then_deferred(
    live: LiveController,
    edge: TestClient,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock(wall=utcnow() - timedelta(hours=1))
    t0 = clock.monotonic()
    # The controller stamps a heartbeat's arrival on the same timeline as the agent.
    monkeypatch.setattr(agents_service, "utcnow", clock.now)
    agent = Agent(
        AgentSettings(
            controller_url=live.url,
            join_token=JOIN_TOKEN,
            node_name="edge-n0",
            cluster="edge",
            state_dir=tmp_path / "edge-n0",
            heartbeat_interval_s=INTERVAL_S,
        ),
        clock=clock,
    )
    assert INTERVAL_S < settings.node_stale_s < settings.node_offline_s

    # While the agent beats, silence detection run just before each next beat (the
    # longest silence a beating agent has) leaves the node Ready.
    between: list[str] = []
    beats = 30
    for k in range(1, beats):
        clock.at(
            t0 + k * INTERVAL_S - 0.001,
            lambda: between.append(mark_silent(settings, clock.now())),
        )
    clock.stop_at = t0 + (beats - 1) * INTERVAL_S + 1  # the agent dies after its 30th beat
    try:
        agent.run(threading.Event())
    finally:
        agent.close()
    assert between == ["Ready"] * (beats - 1)
    last = clock.wall + timedelta(seconds=(beats - 1) * INTERVAL_S)
    seen = node("edge-n0")
    assert (seen.last_seq, seen.last_heartbeat_at) == (beats, last)

    # Silent since ``last``: Stale once the silence exceeds node_stale_s, Offline once it
    # exceeds node_offline_s; not a tick before.
    stale = timedelta(seconds=settings.node_stale_s)
    offline = timedelta(seconds=settings.node_offline_s)
    assert mark_silent(settings, last + stale) == "Ready"
    assert mark_silent(settings, last + stale + TICK) == "Stale"
    assert mark_silent(settings, last + offline) == "Stale"
    assert mark_silent(settings, last + offline + TICK) == "Offline"

    # A rollout then leaves the silent node out (deferred) and completes on the others.
    push_versions(edge, "1.0.0")
    strategy = {"steps": [{"percent": 100}], "maxUnavailable": "100%", "maxDeferred": 1}
    assert apply(edge, rollout_doc("after-silence", "1.0.0", strategy=strategy)).status_code == 200
    assert node_states("after-silence")["edge-n0"] == "Deferred"
    assert drive("after-silence", settings)[-1] == "Succeeded"
    versions = running_versions(settings, ["edge"])
    assert "edge-n0" not in versions
    assert {versions["edge-n1"], versions["edge-n2"]} == {"1.0.0"}
