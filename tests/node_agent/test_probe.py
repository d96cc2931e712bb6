from __future__ import annotations

from pathlib import Path

import pytest

from controller.registry import samples
from node_agent.probe import ProbeFailed, ProbeRequest, probe_model


def _write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    return str(path)


def test_probe_validates_and_benchmarks(tmp_path: Path) -> None:
    req = ProbeRequest(path=_write(tmp_path, samples.build_cnn()), format="onnx", runs=30)
    result = probe_model(req, timeout_s=120)
    assert result["validation"]["passed"] is True
    bench = result["benchmark"]
    assert bench["runs"] == 30
    assert bench["p50_ms"] <= bench["p95_ms"] <= bench["p99_ms"] <= bench["max_ms"]
    # The CNN's weights and arena are a few hundred KiB at least.
    assert bench["model_peak_bytes"] > 100 * 1024


def test_unloadable_model_reports_the_runtime_error(tmp_path: Path) -> None:
    req = ProbeRequest(path=_write(tmp_path, b"\x08\x07garbage"), format="onnx")
    result = probe_model(req, timeout_s=60)
    assert result["validation"]["passed"] is False
    assert result["validation"]["error"].startswith("load failed:")
    assert result["benchmark"] is None


def test_missing_runtime_is_reported(tmp_path: Path) -> None:
    req = ProbeRequest(path=_write(tmp_path, b""), format="coreml")
    result = probe_model(req, timeout_s=60)
    assert result["validation"]["passed"] is False
    assert "runtime unavailable" in result["validation"]["error"]


def test_timeout_is_a_probe_failure(tmp_path: Path) -> None:
    req = ProbeRequest(path=_write(tmp_path, samples.build_cnn()), format="onnx", runs=10_000_000)
    with pytest.raises(ProbeFailed, match="did not finish within"):
        probe_model(req, timeout_s=3)


def test_probe_runs_a_model_with_question_mark_dims(tmp_path: Path) -> None:
    """Input [?, 3, ?, ?] and every weight a Constant node (as paddle2onnx writes them):
    validated at the default sizes, and at a whole shape the metadata gives."""
    path = _write(tmp_path, samples.build_constant_cnn())
    result = probe_model(ProbeRequest(path=path, format="onnx", benchmark=False), timeout_s=120)
    assert result["validation"]["passed"] is True, result["validation"]
    assert result["validation"]["input_shapes"] == {"x": [1, 3, 64, 64]}
    meta = {"validation": {"shapes": {"x": [1, 3, 48, 192]}}}
    req = ProbeRequest(path=path, format="onnx", metadata=meta, benchmark=False)
    result = probe_model(req, timeout_s=120)
    assert result["validation"]["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert result["validation"]["output_shapes"] == {"probabilities": [1, 10]}
