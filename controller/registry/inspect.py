"""Format detection and static inspection of an artifact, without running it.

The format comes from the content, never the file name: a TFLite flatbuffer carries the
file identifier ``TFL3`` at byte 4; anything else must parse as an ONNX ModelProto and
pass the ONNX checker. Corrupt or truncated files fail here, before anything is stored."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from controller.db.models import ModelFormat
from controller.errors import InvalidInput
from controller.registry.tflite_reader import TfliteFormatError, is_tflite, read_tflite


class ArtifactRejected(InvalidInput):
    def __init__(self, message: str) -> None:
        super().__init__(message, loc=("body", "file"))


def detect_format(head: bytes) -> ModelFormat:
    return ModelFormat.TFLITE if is_tflite(head) else ModelFormat.ONNX


def inspect_artifact(path: Path) -> tuple[ModelFormat, dict[str, Any]]:
    data = path.read_bytes()
    if not data:
        raise ArtifactRejected("the artifact is empty")
    fmt = detect_format(data[:8])
    if fmt is ModelFormat.TFLITE:
        return fmt, _inspect_tflite(data)
    return fmt, _inspect_onnx(data)


def _inspect_tflite(data: bytes) -> dict[str, Any]:
    try:
        info = read_tflite(data)
    except TfliteFormatError as exc:
        raise ArtifactRejected(f"not a valid TFLite model: {exc}") from exc
    if not info.inputs or not info.outputs:
        raise ArtifactRejected("TFLite model has no inputs or no outputs in its main subgraph")
    return {
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in info.inputs],
        "outputs": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in info.outputs
        ],
        "schema_version": info.schema_version,
        "parameter_count": info.parameter_count,
        "operator_count": info.operator_count,
        "operators": info.operators,
        "subgraph_count": info.subgraph_count,
    }


def _onnx_value_info(value: Any) -> dict[str, Any]:
    import onnx

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "dtype": kind or "unknown", "shape": None}
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    shape: list[int | str | None] | None = None
    if tensor.HasField("shape"):
        shape = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value >= 0:
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:  # unset or negative (-1, as paddle2onnx writes it): any size, as
                shape.append(None)  # onnxruntime reports it
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _inspect_onnx(data: bytes) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ArtifactRejected(
            "neither a TFLite flatbuffer (no TFL3 identifier) nor a parseable ONNX "
            f"protobuf (truncated or corrupt?): {exc}"
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise ArtifactRejected(
            "not an ONNX model: no ir_version or an empty graph (is this really a model file?)"
        )
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ArtifactRejected(
            f"ONNX model keeps {len(external)} tensor(s) in external data files "
            f"(first: {external[0]!r}); push a single-file model with embedded weights"
        )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ArtifactRejected(f"ONNX checker rejected the model: {exc}") from exc
    initializers = {t.name for t in model.graph.initializer}
    # Weights live in initializers, or (paddle2onnx, some exporters) in Constant nodes.
    weights = list(model.graph.initializer) + [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    params = 0
    for tensor in weights:
        count = 1
        for d in tensor.dims:
            count *= int(d)
        params += count
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "inputs": [_onnx_value_info(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_onnx_value_info(v) for v in model.graph.output],
        "ir_version": int(model.ir_version),
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "parameter_count": params,
        "operator_count": sum(ops.values()),
        "operators": sorted(ops),
    }
