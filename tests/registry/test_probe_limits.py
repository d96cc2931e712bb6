"""A pushed model over the probe's limits ends Invalid, the reason naming the limit and
its setting (controller/registry/service.py: run_validation)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Event
from controller.settings import Settings, get_settings
from tests.hostile_models import cpu_burner, memory_bomb
from tests.registry.test_endpoints import pushed


@pytest.fixture
def cpu_limit_2s(settings: Settings) -> Iterator[None]:
    """A 2 s CPU limit, for this test only: on the fixture's settings and on the ones the
    validation task reads (get_settings(), which another test may have renewed)."""
    targets = {id(s): s for s in (settings, get_settings())}.values()
    saved = [(s, s.probe_cpu_limit_s) for s in targets]
    for s in targets:
        s.probe_cpu_limit_s = 2
    try:
        yield
    finally:
        for s, value in saved:
            s.probe_cpu_limit_s = value


def test_settings_default_limits(settings: Settings) -> None:
    assert settings.probe_memory_limit_mb == 2048
    assert settings.probe_cpu_limit_s == 600


def test_memory_bomb_is_invalid_naming_the_memory_limit(
    client: TestClient, session: Session
) -> None:
    data = memory_bomb()
    assert len(data) < 200
    body = pushed(client, data, name="bomb")
    assert body["status"] == "Invalid", body
    reason = body["status_message"]
    assert reason.startswith(
        "the model exceeded the memory limit of 2048 MiB (EDGEFLEET_PROBE_MEMORY_LIMIT_MB): "
        "inference failed:"
    ), reason
    assert body["validation"]["passed"] is False
    assert body["validation"]["error"] == reason
    assert body["benchmark"] is None
    event = session.scalars(
        select(Event).where(Event.object_name == "bomb:1.0.0", Event.reason == "ValidationFailed")
    ).one()
    assert event.message == reason


def test_cpu_burner_is_invalid_naming_the_cpu_limit(client: TestClient, cpu_limit_2s: None) -> None:
    body = pushed(client, cpu_burner(), name="burner")
    assert body["status"] == "Invalid", body
    assert body["status_message"] == (
        "the model exceeded the CPU time limit of 2 s (EDGEFLEET_PROBE_CPU_LIMIT_S): "
        "killed by SIGXCPU"
    )
