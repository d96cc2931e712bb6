"""Fixtures of the edge-side tests: the models built in code and a running server for the
CNN (the inference server's tests); the real controller and a simulated cluster for the
agent to enrol in (the agent's tests against it). (No ``client`` here: tests/conftest.py's
API client keeps that name.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from controller.api.app import create_app
from controller.settings import Settings
from node_agent.server.app import InferenceServer
from tests.live import LiveController, live_controller
from tests.node_agent.test_serve_helpers import Models, running, settings_for, write_models
from tests.rollouts.helpers import apply, cluster_doc

# Runs in its own numpy<2 + tflite_runtime environment, from scripts/test: here, with
# LiteRT installed, its tests would fail by design.
collect_ignore = ["tflite_legacy"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def cnn_server(models: Models, tmp_path: Path) -> Iterator[InferenceServer]:
    with running(settings_for(tmp_path, models.cnn)) as server:
        yield server


@pytest.fixture
def live(
    settings: Settings, connection: Connection, redis_available: None, join_token: str
) -> Iterator[LiveController]:
    """The controller under uvicorn, on the test's rolled-back connection."""
    with live_controller(create_app(settings)) as c:
        yield c


@pytest.fixture
def edge(client: TestClient, sim_fleet: None) -> TestClient:
    """Cluster ``edge``: nodes edge-n0, edge-n1, edge-n2."""
    assert apply(client, cluster_doc("edge", 3)).status_code == 200
    return client
