from __future__ import annotations

import sys

import numpy as np
import pytest

from controller.registry import samples
from controller.registry.tflite_builder import build_tflite_mlp, reference_mlp
from node_agent.runtimes import (
    InputHints,
    OnnxRunner,
    RuntimeUnavailable,
    TensorSpec,
    TfliteRunner,
    concrete_shape,
    generate_inputs,
    load_tflite_interpreter,
)

NO_HINTS = InputHints(dims={}, shapes={}, values={})


def test_litert_is_preferred() -> None:
    cls, label = load_tflite_interpreter()
    assert label.startswith("ai_edge_litert ")
    assert cls.__module__.startswith("ai_edge_litert")


def test_falls_back_to_tflite_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """With LiteRT absent, the legacy package is used. A stand-in ``tflite_runtime``
    (LiteRT's interpreter module under the old name) proves the import order."""
    import types

    import ai_edge_litert.interpreter as litert_interp

    fake = types.ModuleType("tflite_runtime")
    fake.__version__ = "2.14.0"  # type: ignore[attr-defined]
    fake_interp = types.ModuleType("tflite_runtime.interpreter")
    fake_interp.Interpreter = litert_interp.Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_interp)
    _cls, label = load_tflite_interpreter()
    assert label == "tflite_runtime 2.14.0"
    runner = TfliteRunner(build_tflite_mlp(), threads=1)
    assert runner.runtime == "tflite_runtime 2.14.0"


def test_no_tflite_runtime_names_both_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in (
        "ai_edge_litert",
        "ai_edge_litert.interpreter",
        "tflite_runtime",
        "tflite_runtime.interpreter",
    ):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(RuntimeUnavailable, match=r"ai-edge-litert .* tflite-runtime"):
        load_tflite_interpreter()


def test_tflite_runner_resizes_dynamic_batch() -> None:
    runner = TfliteRunner(build_tflite_mlp(in_features=8, hidden=16, out_features=4), threads=1)
    assert runner.inputs == [TensorSpec("input", "float32", (None, 8))]
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    out = runner.run({"input": x})["probabilities"]
    want = reference_mlp(x, in_features=8, hidden=16, out_features=4, seed=0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert out.shape == (3, 4)


def test_onnx_runner_matches_a_second_session() -> None:
    import onnxruntime as ort

    data = samples.build_cnn()
    runner = OnnxRunner(data, threads=1)
    assert runner.inputs == [TensorSpec("image", "float32", ("batch", 3, 32, 32))]
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = runner.run({"image": x})["probabilities"]
    (want,) = ort.InferenceSession(data).run(None, {"image": x})
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_concrete_shapes_follow_hints_then_defaults() -> None:
    spec = TensorSpec("x", "float32", ("batch", None, "seq", 4))
    assert concrete_shape(spec, NO_HINTS, default_dim=64) == (1, 64, 64, 4)
    assert concrete_shape(spec, NO_HINTS, default_dim=64, unknown_dim=1) == (1, 1, 1, 4)
    hints = InputHints(dims={"seq": 5}, shapes={}, values={})
    assert concrete_shape(spec, hints, default_dim=64) == (1, 64, 5, 4)
    hints = InputHints(dims={}, shapes={"x": [2, 3, 4, 4]}, values={})
    assert concrete_shape(spec, hints, default_dim=64) == (2, 3, 4, 4)


def test_a_question_mark_dim_takes_no_named_hint() -> None:
    """``?`` names no dim: a ``dims`` hint for "?" would size every unnamed dim of every
    input alike, the very tie issue #17 removed; such a model is sized by ``shapes``."""
    spec = TensorSpec("x", "float32", (None, 3, "?", "?"))
    hints = InputHints(dims={"?": 48}, shapes={}, values={})
    assert concrete_shape(spec, hints, default_dim=64) == (1, 3, 64, 64)
    hints = InputHints(dims={}, shapes={"x": [1, 3, 48, 192]}, values={})
    assert concrete_shape(spec, hints, default_dim=64) == (1, 3, 48, 192)


def test_generated_inputs_respect_dtypes_and_values() -> None:
    specs = [
        TensorSpec("f", "float16", (2, 3)),
        TensorSpec("i", "int64", ("n",)),
        TensorSpec("b", "bool", (4,)),
        TensorSpec("sr", "int64", ()),
    ]
    hints = InputHints(dims={"n": 7}, shapes={}, values={"sr": 16000})
    feeds = generate_inputs(specs, hints, default_dim=64)
    assert (feeds["f"].dtype.name, feeds["f"].shape) == ("float16", (2, 3))
    assert (feeds["i"].dtype.name, feeds["i"].shape) == ("int64", (7,))
    assert feeds["b"].dtype == np.bool_
    assert feeds["sr"].shape == ()
    assert int(feeds["sr"]) == 16000
    again = generate_inputs(specs, hints, default_dim=64)
    np.testing.assert_array_equal(feeds["f"], again["f"])  # deterministic


def test_unknown_execution_provider_is_refused() -> None:
    """Providers come from settings (EDGEFLEET_SERVE_PROVIDERS); a provider this
    onnxruntime build lacks is an error, not a silent fallback."""
    from node_agent.runtimes import open_runner

    runner = open_runner(samples.build_cnn(), "onnx", providers=["CPUExecutionProvider"])
    assert getattr(runner, "providers", None) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeUnavailable, match="NoSuchExecutionProvider"):
        open_runner(samples.build_cnn(), "onnx", providers=["NoSuchExecutionProvider"])
