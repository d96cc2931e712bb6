"""Fixtures of the inference-server tests: the models built in code, and a running
server for the CNN. (No ``client`` here: tests/conftest.py's API client keeps that name.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.server.app import InferenceServer
from tests.node_agent.test_serve_helpers import Models, running, settings_for, write_models

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
