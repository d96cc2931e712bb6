"""node_agent.runtimes on the real tflite_runtime 2.14 under numpy<2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from node_agent.runtimes import (
    TensorSpec,
    TfliteRunner,
    load_tflite_interpreter,
    open_runner,
    preload_runtime,
)
from tests.node_agent.tflite_legacy import TFLITE_RUNTIME
from tests.node_agent.tflite_legacy.tflite_model import (
    build_mlp,
    reference_mlp,
    reference_two_inputs,
)


def test_the_interpreter_is_tflite_runtimes_under_numpy_1() -> None:
    assert int(np.__version__.split(".")[0]) < 2, np.__version__
    # Installed, LiteRT would come first: this environment must not have it at all.
    assert importlib.util.find_spec("ai_edge_litert") is None
    preload_runtime("tflite")
    cls, label = load_tflite_interpreter()
    assert label == TFLITE_RUNTIME
    assert cls.__module__ == "tflite_runtime.interpreter"
    assert importlib.util.find_spec("tflite_runtime.interpreter") is not None


def test_mlp_matches_numpy_across_batch_resizes() -> None:
    runner = TfliteRunner(build_mlp(), threads=1)
    assert runner.runtime == TFLITE_RUNTIME
    assert runner.inputs == [TensorSpec("input", "float32", (None, 8))]
    assert runner.outputs == [TensorSpec("probabilities", "float32", (None, 4))]
    rng = np.random.default_rng(1)
    # 1 is the batch allocated at load; 5 and back to 2 resize the input tensor.
    for batch in (1, 5, 2):
        x = rng.standard_normal((batch, 8)).astype(np.float32)
        out = runner.run({"input": x})["probabilities"]
        assert out.shape == (batch, 4)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, reference_mlp(x), rtol=1e-5, atol=1e-6)


def test_two_inputs_from_a_file_are_fed_by_name(two_inputs_path: Path) -> None:
    runner = open_runner(two_inputs_path, "tflite", threads=2)
    assert runner.runtime == TFLITE_RUNTIME
    assert [s.name for s in runner.inputs] == ["a", "b"]
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((1, 4)).astype(np.float32) for _ in range(2))
    # Given in the other order than the model declares them.
    out = runner.run({"b": b, "a": a})["out"]
    np.testing.assert_allclose(out, reference_two_inputs(a, b), rtol=1e-6)
