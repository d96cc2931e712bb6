"""The TFLite builder makes models LiteRT runs, and the pure-Python reader describes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# LiteRT is a required dependency of the controller: a missing one fails, never skips.
import ai_edge_litert.schema_py_generated as schema
import flatbuffers
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from controller.registry import tflite_reader
from controller.registry.tflite_builder import (
    build_tflite_mlp,
    build_tflite_two_inputs,
    reference_mlp,
    reference_two_inputs,
)
from controller.registry.tflite_reader import (
    TfliteFormatError,
    TfliteInfo,
    TfliteTensorInfo,
    is_tflite,
    read_tflite,
)

MLP: dict[str, Any] = {"in_features": 8, "hidden": 16, "out_features": 4, "seed": 0}
MLP_PARAMETERS = 8 * 16 + 16 + 16 * 4 + 4  # two kernels and two biases: 212


@pytest.fixture(scope="module")
def mlp() -> bytes:
    return build_tflite_mlp(**MLP)


@pytest.fixture(scope="module")
def two_inputs() -> bytes:
    return build_tflite_two_inputs()


def _unpack(data: bytes) -> Any:
    return schema.ModelT.InitFromPackedBuf(bytearray(data), 0)


def _pack(model: Any) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _run(model: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    interpreter = Interpreter(model_content=model)
    details = {d["name"]: d for d in interpreter.get_input_details()}
    for name, value in feeds.items():
        if tuple(details[name]["shape"]) != value.shape:
            interpreter.resize_tensor_input(details[name]["index"], list(value.shape), strict=True)
    interpreter.allocate_tensors()
    for name, value in feeds.items():
        interpreter.set_tensor(details[name]["index"], value)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


# -- the models run in LiteRT and match an independent numpy forward pass ---------------


@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_runs_in_litert_and_matches_numpy(mlp: bytes, batch: int) -> None:
    x = np.random.default_rng(42).standard_normal((batch, 8)).astype(np.float32)
    out = _run(mlp, {"input": x})["probabilities"]
    assert out.shape == (batch, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference_mlp(x, **MLP), rtol=1e-5)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_mlp_is_deterministic_and_seeded() -> None:
    assert build_tflite_mlp(seed=3) == build_tflite_mlp(seed=3)
    assert build_tflite_mlp(seed=3) != build_tflite_mlp(seed=4)


def test_static_batch_mlp_refuses_a_strict_resize() -> None:
    model = build_tflite_mlp(**MLP, dynamic_batch=False)
    assert read_tflite(model).inputs == [TfliteTensorInfo("input", "float32", [1, 8])]
    x = np.ones((1, 8), np.float32)
    np.testing.assert_allclose(
        _run(model, {"input": x})["probabilities"], reference_mlp(x, **MLP), rtol=1e-5
    )
    with pytest.raises(RuntimeError):
        _run(model, {"input": np.ones((3, 8), np.float32)})


def test_two_inputs_runs_in_litert_and_matches_numpy(two_inputs: bytes) -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((1, 4)).astype(np.float32)
    b = rng.standard_normal((1, 4)).astype(np.float32)
    out = _run(two_inputs, {"a": a, "b": b})["out"]
    np.testing.assert_allclose(out, reference_two_inputs(a, b), rtol=1e-5)


# -- read_tflite describes them ---------------------------------------------------------


def test_read_mlp(mlp: bytes) -> None:
    assert is_tflite(mlp)
    assert read_tflite(mlp) == TfliteInfo(
        schema_version=3,
        inputs=[TfliteTensorInfo("input", "float32", [None, 8])],
        outputs=[TfliteTensorInfo("probabilities", "float32", [None, 4])],
        parameter_count=MLP_PARAMETERS,
        operator_count=3,
        subgraph_count=1,
        description="edgefleet demo MLP 8-16-4",
        operators=["FULLY_CONNECTED", "SOFTMAX"],
    )


def test_read_two_inputs(two_inputs: bytes) -> None:
    info = read_tflite(two_inputs)
    assert info.inputs == [
        TfliteTensorInfo("a", "float32", [1, 4]),
        TfliteTensorInfo("b", "float32", [1, 4]),
    ]
    assert info.outputs == [TfliteTensorInfo("out", "float32", [1, 4])]
    assert info.parameter_count == 4
    assert info.operators == ["ADD", "MUL"]
    assert (info.schema_version, info.operator_count, info.subgraph_count) == (3, 2, 1)


def test_parameter_count_follows_the_sizes() -> None:
    info = read_tflite(build_tflite_mlp(in_features=5, hidden=7, out_features=3))
    assert info.parameter_count == 5 * 7 + 7 + 7 * 3 + 3
    assert info.inputs[0].shape == [None, 5]


@pytest.mark.parametrize("build", [build_tflite_mlp, build_tflite_two_inputs])
def test_reader_agrees_with_the_interpreter(build: Callable[[], bytes]) -> None:
    model = build()
    info = read_tflite(model)
    interpreter = Interpreter(model_content=model)
    for mine, theirs in [
        (info.inputs, interpreter.get_input_details()),
        (info.outputs, interpreter.get_output_details()),
    ]:
        assert [t.name for t in mine] == [d["name"] for d in theirs]
        assert [t.dtype for t in mine] == [np.dtype(d["dtype"]).name for d in theirs]
        assert [t.shape for t in mine] == [
            [None if v < 0 else int(v) for v in d["shape_signature"]] for d in theirs
        ]


def test_name_tables_match_the_schema() -> None:
    for name, code in vars(schema.BuiltinOperator).items():
        if not name.startswith("_"):
            assert tflite_reader._BUILTIN_OPS[code] == name
    for name, code in vars(schema.TensorType).items():
        if not name.startswith("_"):
            assert tflite_reader._DTYPES[code] == name.lower()


def test_effective_builtin_code_is_the_larger_of_the_two_fields(mlp: bytes) -> None:
    model = _unpack(mlp)
    for code in model.operatorCodes:
        code.deprecatedBuiltinCode = 0  # as if written by a converter that left it unset
    assert read_tflite(_pack(model)).operators == ["FULLY_CONNECTED", "SOFTMAX"]
    model.operatorCodes[0].builtinCode = 0
    model.operatorCodes[0].deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    assert read_tflite(_pack(model)).operators == ["FULLY_CONNECTED", "SOFTMAX"]


def test_custom_ops_are_named_by_their_code(two_inputs: bytes) -> None:
    model = _unpack(two_inputs)
    code = model.operatorCodes[1]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = "EdgeScale"
    assert read_tflite(_pack(model)).operators == ["ADD", "CUSTOM:EdgeScale"]


def test_buffers_stored_outside_the_flatbuffer_count_as_parameters(two_inputs: bytes) -> None:
    model = _unpack(two_inputs)
    scale = model.buffers[model.subgraphs[0].tensors[4].buffer]
    scale.data, scale.offset, scale.size = None, 8, 16  # any in-file range will do
    assert read_tflite(_pack(model)).parameter_count == 4
    scale.offset = 1  # the converter's placeholder: no data
    assert read_tflite(_pack(model)).parameter_count == 0
    scale.offset = 1 << 40
    with pytest.raises(TfliteFormatError, match=r"data bytes of buffer \d+ points past the end"):
        read_tflite(_pack(model))


def test_missing_description_is_none(two_inputs: bytes) -> None:
    model = _unpack(two_inputs)
    model.description = None
    assert read_tflite(_pack(model)).description is None


# -- malformed input always raises TfliteFormatError ------------------------------------


def _read_or_format_error(data: bytes) -> TfliteInfo | None:
    """read_tflite's result, or None if it raised TfliteFormatError (anything else fails)."""
    try:
        return read_tflite(data)
    except TfliteFormatError:
        return None


@pytest.mark.parametrize("build", [build_tflite_mlp, build_tflite_two_inputs])
def test_every_truncation_is_a_format_error(build: Callable[[], bytes]) -> None:
    model = build()
    for cut in range(len(model)):  # every prefix: the models are small enough
        with pytest.raises(TfliteFormatError):
            read_tflite(model[:cut])


def test_truncation_messages_say_truncated(mlp: bytes) -> None:
    cuts = np.linspace(8, len(mlp) - 1, 50).astype(int)
    for cut in cuts:
        with pytest.raises(TfliteFormatError, match=rf"past the end of the {cut}-byte file"):
            read_tflite(mlp[:cut])


def _field_pos(table: Any, slot: int) -> int:
    """Absolute position of a present field of a generated-schema table."""
    offset = table._tab.Offset(4 + 2 * slot)
    assert offset
    return int(table._tab.Pos + offset)


@pytest.mark.parametrize(
    ("locate", "what"),
    [
        (lambda m: 0, "offset 0x7f000008 of model points past the end"),
        (lambda m: m._tab.Pos, "of vtable of model points before the start of the file"),
        (lambda m: _field_pos(m, 2), "subgraphs of model"),
        (lambda m: _field_pos(m, 4), "buffers of model"),
        (lambda m: _field_pos(m.Subgraphs(0).Tensors(3), 3), "name of subgraph 0 tensor 3"),
        (lambda m: _field_pos(m.Subgraphs(0).Tensors(1), 0), "shape of subgraph 0 tensor 1"),
        (lambda m: _field_pos(m.Buffers(1), 0), "data of buffer 1"),
        (lambda m: _field_pos(m.Subgraphs(0), 3), "operators of subgraph 0"),
    ],
)
def test_corrupt_offsets_are_named(mlp: bytes, locate: Callable[[Any], int], what: str) -> None:
    pos = locate(schema.Model.GetRootAs(mlp, 0))
    corrupt = bytearray(mlp)
    corrupt[pos + 3] = 0x7F  # the high byte of the (s)offset: now far outside the file
    with pytest.raises(TfliteFormatError, match=what):
        read_tflite(bytes(corrupt))


@pytest.mark.parametrize("build", [build_tflite_mlp, build_tflite_two_inputs])
def test_single_byte_corruptions_never_leak_other_exceptions(build: Callable[[], bytes]) -> None:
    model = build()
    errors = 0
    for pos in range(len(model)):
        for value in (0x00, 0xFF, model[pos] ^ 0x01):
            corrupt = bytearray(model)
            corrupt[pos] = value
            errors += _read_or_format_error(bytes(corrupt)) is None
    assert errors > len(model) // 2  # most bytes are structure, not weights


def test_random_garbage_behind_the_identifier_is_a_format_error() -> None:
    rng = np.random.default_rng(0)
    for size in [8, 9, 16, 64, 512, 4096] * 20:
        data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        data[4:8] = b"TFL3"
        _read_or_format_error(bytes(data))


@pytest.mark.parametrize(
    "data",
    [b"", b"TFL3", b"\x00" * 7, b"\x08\x00\x00\x00ONNX" + bytes(64), b"PK\x03\x04" + bytes(60)],
)
def test_non_tflite_bytes(data: bytes) -> None:
    assert not is_tflite(data)
    with pytest.raises(TfliteFormatError):
        read_tflite(data)


def test_wrong_identifier_is_named(mlp: bytes) -> None:
    data = mlp[:4] + b"TFL2" + mlp[8:]
    assert not is_tflite(data)
    with pytest.raises(TfliteFormatError, match="not a TFLite model"):
        read_tflite(data)


def test_message_names_the_file_size(mlp: bytes) -> None:
    with pytest.raises(TfliteFormatError, match=rf"the {len(mlp) - 40}-byte file \(truncated\?\)"):
        read_tflite(mlp[:-40])
