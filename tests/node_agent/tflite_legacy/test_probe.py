"""The validation probe and benchmark on tflite_runtime: node_agent.probe's child started
by the real launcher, in this (numpy<2, tflite_runtime) environment."""

from __future__ import annotations

from pathlib import Path

from node_agent.probe import ProbeRequest, probe_model
from node_agent.probe_launcher import DEFAULT_MEMORY_LIMIT_MB
from tests.node_agent.tflite_legacy import TFLITE_RUNTIME
from tests.node_agent.tflite_legacy.tflite_model import build_memory_bomb


def test_probe_validates_and_benchmarks(mlp_path: Path) -> None:
    req = ProbeRequest(path=str(mlp_path), format="tflite", runs=20, warmup_runs=2)
    result = probe_model(req, timeout_s=60)
    validation = result["validation"]
    assert validation["passed"] is True, validation
    # The child runs on this environment's interpreter, so on tflite_runtime too.
    assert validation["runtime"] == TFLITE_RUNTIME
    assert validation["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 8]}]
    assert validation["input_shapes"] == {"input": [1, 8]}
    assert validation["output_shapes"] == {"probabilities": [1, 4]}
    bench = result["benchmark"]
    assert bench["runtime"] == TFLITE_RUNTIME
    assert bench["runs"] == 20
    assert 0 < bench["min_ms"] <= bench["p50_ms"] <= bench["p95_ms"] <= bench["max_ms"]


def test_probe_resizes_to_the_hinted_batch(mlp_path: Path) -> None:
    req = ProbeRequest(
        path=str(mlp_path),
        format="tflite",
        metadata={"validation": {"shapes": {"input": [3, 8]}}},
        benchmark=False,
    )
    result = probe_model(req, timeout_s=60)
    validation = result["validation"]
    assert validation["passed"] is True, validation
    assert validation["output_shapes"] == {"probabilities": [3, 4]}
    assert result["benchmark"] is None


def test_not_a_model_reports_the_runtime_error(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not a flatbuffer at all" * 4)
    result = probe_model(ProbeRequest(path=str(path), format="tflite"), timeout_s=60)
    assert result["validation"]["passed"] is False
    assert result["validation"]["error"].startswith("load failed:"), result
    assert result["benchmark"] is None


def test_memory_bomb_is_refused_under_the_limit(tmp_path: Path) -> None:
    """``a + b`` over [1, 10^9] float32: three 4 GB tensors. Where LiteRT fails with an
    empty RuntimeError, tflite_runtime says std::bad_alloc: either way the verdict names
    the limit and its setting."""
    path = tmp_path / "bomb.tflite"
    path.write_bytes(build_memory_bomb())
    req = ProbeRequest(path=str(path), format="tflite", runs=2)
    result = probe_model(req, timeout_s=60)
    error = result["validation"]["error"]
    assert result["validation"]["passed"] is False
    assert error.startswith(
        f"the model exceeded the memory limit of {DEFAULT_MEMORY_LIMIT_MB} MiB "
        "(EDGEFLEET_PROBE_MEMORY_LIMIT_MB): load failed:"
    ), error
    assert "std::bad_alloc" in error
