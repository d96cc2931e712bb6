"""Fixtures of the tflite_runtime tests. On purpose the only conftest loaded in their run
(``--confcutdir``): ``tests/conftest.py`` imports the controller and needs Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.node_agent.tflite_legacy.tflite_model import build_mlp, build_two_inputs


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.tflite"
    path.write_bytes(build_mlp())
    return path


@pytest.fixture
def two_inputs_path(tmp_path: Path) -> Path:
    path = tmp_path / "two_inputs.tflite"
    path.write_bytes(build_two_inputs())
    return path
