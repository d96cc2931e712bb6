"""Model optimization: derive a smaller or faster variant of an ONNX model and prove,
with numbers, how close it stays to the original.

Methods: int8 dynamic quantization (MatMul/recurrent-heavy models), int8 static
quantization in QDQ format with calibration data (CNNs), fp16 conversion, and magnitude
pruning to a target sparsity. The comparison runs both models (ONNX, or TFLite for a
variant pushed with its parent) on the same inputs in one process: max and mean absolute
error per output, allclose at given tolerances, top-1 agreement for classifier-like
outputs, size ratios and side-by-side latency.

The methods are here; sample inputs (uploaded or generated) in ``sample_inputs.py``, the
comparison and its verdict in ``compare.py``."""

from __future__ import annotations

import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

METHODS = ("dynamic-int8", "static-int8", "fp16", "prune")
Feeds = dict[str, np.ndarray]


class OptimizationError(ValueError):
    pass


@dataclass
class Variant:
    data: bytes
    details: dict[str, Any]
    warnings: list[str]


def size_compressed(data: bytes) -> int:
    return len(zlib.compress(data, 6))


@dataclass
class _Reader:
    samples: list[Feeds]

    def __post_init__(self) -> None:
        self._it: Iterator[Feeds] = iter(self.samples)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.samples)


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QUANT_FORMATS = ("qoperator", "qdq")
CPU = "CPUExecutionProvider"
CPU_FAST_INT8 = ("Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "MaxPool", "GlobalAveragePool")
"""The operator types static int8 quantizes for the CPU provider: the bulk of the compute,
which onnxruntime's CPU kernels run in int8 (QLinearConv, QLinearMatMul, QGemm); the
residual Add and the pools between them, which keep the chain in int8; Relu and Clip,
which cost nothing (folded into the range of the tensor before them). The rest stays
fp32: in mobile CNNs mostly activations (hard-swish is Add, Clip, Mul, Div; sigmoid),
where int8 adds a requantization per operator and saves no compute. Measured with
bench/bench_quantize.py's models, p50 ratio to the parent: the Constant-weights CNN
x0.6 with this set against x1.1 with Conv, MatMul and Gemm alone; the PP-OCR direction
classifier x1.3 against x1.6, its detector x0.8 either way (2-vCPU x86 VM)."""


def constants_to_initializers(proto: onnx.ModelProto) -> int:
    """Move the main graph's ``Constant`` tensors (weights as some exporters, paddle2onnx
    among them, write them) into initializers under the same name, so the quantizers,
    which quantize initializers only, see them as weights. Returns how many moved."""
    kept: list[onnx.NodeProto] = []
    moved = 0
    taken = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        attrs = list(node.attribute)
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and len(attrs) == 1
            and attrs[0].name == "value"
            and len(node.output) == 1
            and node.output[0] not in taken
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs[0].t)
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
            taken.add(tensor.name)
            moved += 1
        else:
            kept.append(node)
    if moved:
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return moved


def flatten_gemm_biases(proto: onnx.ModelProto) -> int:
    """Write each Gemm's bias initializer of shape ``(1, N)`` as ``(N,)``: the same
    broadcast, but onnxruntime's static quantizer (1.32) indexes a per-channel bias by
    channel and fails on the 2-d form with "The truth value of an array with more than
    one element is ambiguous" (jax2tf writes it so: Magika's classifier). Returns how
    many changed."""
    biases = {t.name: t for t in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3:
            continue
        bias = biases.get(node.input[2])
        if bias is None or len(bias.dims) != 2 or bias.dims[0] != 1 or uses[bias.name] != 1:
            continue
        flat = numpy_helper.to_array(bias).reshape(-1)
        bias.CopyFrom(numpy_helper.from_array(flat, bias.name))
        changed += 1
    return changed


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare(model: bytes, *, per_channel: bool) -> tuple[bytes, list[str], bool]:
    """The graph as the quantizer should see it: Constant weights as initializers, the
    opset per-channel scales need (13), then onnxruntime's ``quant_pre_process`` (shape
    inference, BatchNormalization folded into Conv, constant folding), with a fallback
    at each step that fails. Returns the model, what was done (for the report), and
    whether per-channel weights remain possible."""
    # (onnxruntime.quantization is imported where used, as in quantize: only the worker
    # deriving variants needs it, not every process importing this module)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    steps: list[str] = []
    proto = onnx.load_from_string(model)
    moved = constants_to_initializers(proto)
    if moved:
        steps.append(f"moved {moved} Constant tensor(s) to initializers")
    if per_channel and _opset(proto) < 13:
        before = _opset(proto)
        try:
            proto = version_converter.convert_version(proto, 13)
            steps.append(f"opset {before} -> 13 (per-channel scales need it)")
        except Exception as exc:
            per_channel = False
            steps.append(f"per-tensor weights: opset {before} could not be raised to 13 ({exc})")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(proto.SerializeToString())
        failures: list[str] = []
        # Symbolic shape inference needs sympy; without it (or where it fails on the
        # graph) onnx's shape inference and onnxruntime's optimizer still apply.
        for skip_symbolic in (False, True):
            try:
                quant_pre_process(src, dst, skip_symbolic_shape=skip_symbolic)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            how = "with" if not skip_symbolic else "without"
            steps.append(f"quant_pre_process ({how} symbolic shape inference)")
            if failures:
                steps.append(f"symbolic shape inference failed: {failures[0]}")
            proto = onnx.load(dst)
            break
        else:
            steps.append(
                f"quant_pre_process failed ({'; '.join(failures)}): onnx shape inference only"
            )
            try:
                proto = onnx.shape_inference.infer_shapes(proto)
            except Exception as exc:
                steps.append(f"onnx shape inference failed too: {exc}")
    # (after quant_pre_process, whose constant folding may have made the bias)
    if flattened := flatten_gemm_biases(proto):
        steps.append(f"{flattened} Gemm bias(es) of shape (1, N) written as (N,)")
    return proto.SerializeToString(), steps, per_channel


def _strip(model: bytes) -> bytes:
    """Drop what only the quantizer needed: the inferred shapes of intermediate tensors
    (onnxruntime infers them again at load) and doc strings."""
    proto = onnx.load_from_string(model)
    del proto.graph.value_info[:]
    for node in proto.graph.node:
        node.doc_string = ""
    return bytes(proto.SerializeToString())


_INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _quantized_op(node: onnx.NodeProto) -> bool:
    """An operator that takes quantized tensors and their scales and zero points."""
    return node.op_type in (
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
    ) or node.op_type.startswith("QLinear")


def size_breakdown(variant: bytes, parent_size: int) -> dict[str, Any]:
    """Where a quantized variant's bytes go, each part as bytes and as a ratio to its
    parent's size, read from the variant's graph: int8 weights (int8 initializers of
    rank 2 and more), int32 biases (a quantized Conv or Gemm adds its bias in int32, so
    it stays 4 bytes a value), scales and zero points (one per tensor, or per output
    channel of a per-channel weight), float initializers still read in float (by the
    operator types that read them, largest first), other initializers (shapes, axes)
    and the graph itself (nodes and tensor names: what no weight format shrinks); in
    the main graph and its subgraphs (If branches, Loop bodies).
    ``floor``: everything but the int8 weights, the size the variant cannot go below by
    shrinking its weights further; ``explanation`` says it in words."""
    graphs = list(_graphs(onnx.load_from_string(variant).graph))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for graph in graphs:
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
    parts = dict.fromkeys(
        ("int8_weights", "int32_biases", "scales_and_zero_points", "float", "other", "graph"), 0
    )
    float_by_op: dict[str, int] = {}
    largest_float: list[tuple[int, str, str]] = []
    for tensor in (t for graph in graphs for t in graph.initializer):
        size = len(tensor.SerializeToString())
        by = readers.get(tensor.name, [])
        if tensor.data_type in _INT8:
            parts["int8_weights" if len(tensor.dims) >= 2 else "scales_and_zero_points"] += size
        elif tensor.data_type == onnx.TensorProto.INT32 and any(_quantized_op(n) for n in by):
            parts["int32_biases"] += size
        elif tensor.data_type in _FLOATS and by and all(_quantized_op(n) for n in by):
            parts["scales_and_zero_points"] += size
        elif tensor.data_type in _FLOATS:
            parts["float"] += size
            ops = "/".join(sorted({n.op_type for n in by})) or "no operator"
            float_by_op[ops] = float_by_op.get(ops, 0) + size
            largest_float.append((size, tensor.name, ops))
        else:
            parts["other"] += size
    parts["graph"] = len(variant) - sum(parts.values())
    ratio = {k: round(v / parent_size, 4) for k, v in parts.items()}
    floor = round((len(variant) - parts["int8_weights"]) / parent_size, 4)
    largest_float.sort(reverse=True)
    said = [
        f"int32 biases x{ratio['int32_biases']}",
        f"scales and zero points x{ratio['scales_and_zero_points']}",
        f"float tensors not quantized x{ratio['float']}"
        + (
            " (read by " + ", ".join(f"{op} {b} B" for op, b in _by_size(float_by_op)) + ")"
            if float_by_op
            else ""
        ),
        f"graph nodes and names x{ratio['graph']}",
    ]
    if parts["other"]:
        said.append(f"other initializers x{ratio['other']}")
    return {
        "bytes": parts,
        "ratio": ratio,
        "float_by_op": dict(_by_size(float_by_op)),
        "largest_float": [
            {"tensor": name, "bytes": size, "read_by": ops} for size, name, ops in largest_float[:5]
        ],
        "floor": floor,
        "explanation": (
            f"size x{round(len(variant) / parent_size, 4)}: int8 weights x"
            f"{ratio['int8_weights']}, the rest x{floor}: " + ", ".join(said)
        ),
    }


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If branches, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _by_size(parts: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(parts.items(), key=lambda item: -item[1])


def quantize(
    model: bytes,
    method: str,
    *,
    samples: list[Feeds] | None,
    per_channel: bool | None = None,
    target: str = CPU,
    quant_format: str | None = None,
    calibration: str = "minmax",
    op_types: Sequence[str] | None = None,
) -> Variant:
    """``per_channel`` ``None``: per-channel weights where static int8 meets a Conv.
    ``quant_format`` ``None``: QOperator on the CPU provider (fused int8 kernels, and the
    smaller file), QDQ for every other provider (the format accelerators' providers
    consume). ``op_types`` ``None``: :data:`CPU_FAST_INT8` on the CPU, else the
    quantizer's own list."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if per_channel is None:  # (dynamic int8 stays per-tensor unless asked, as it was)
        graph = onnx.load_from_string(model).graph
        per_channel = method == "static-int8" and any(n.op_type == "Conv" for n in graph.node)
    wanted_per_channel = per_channel
    prepared, steps, per_channel_ok = prepare(model, per_channel=wanted_per_channel)
    details: dict[str, Any] = {"preparation": steps}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(prepared)
        if method == "dynamic-int8":
            quantize_dynamic(
                src,
                dst,
                weight_type=QuantType.QInt8,
                per_channel=wanted_per_channel and per_channel_ok,
            )
            details["per_channel"] = wanted_per_channel and per_channel_ok
        else:
            assert samples is not None
            fmt = quant_format or ("qoperator" if target == CPU else "qdq")
            if fmt not in QUANT_FORMATS:
                raise OptimizationError(
                    f"unknown format {fmt!r}: expected one of {', '.join(QUANT_FORMATS)}"
                )
            if calibration not in CALIBRATION_METHODS:
                raise OptimizationError(
                    f"unknown calibration {calibration!r}: expected one of "
                    f"{', '.join(CALIBRATION_METHODS)}"
                )
            ops = (
                list(op_types)
                if op_types is not None
                else (list(CPU_FAST_INT8) if target == CPU else None)
            )
            qoperator = fmt == "qoperator"
            quantize_static(
                src,
                dst,
                _Reader(samples),
                quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                op_types_to_quantize=ops,
                # u8 activations with s8 weights: the pair onnxruntime's x86 and ARM
                # QLinear kernels are fastest at; QDQ for accelerators wants s8/s8.
                activation_type=QuantType.QUInt8 if qoperator else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=wanted_per_channel and per_channel_ok,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[calibration],
            )
            details.update(
                per_channel=wanted_per_channel and per_channel_ok,
                format=fmt,
                target=target,
                calibration=calibration,
                op_types=ops or "all the quantizer supports",
            )
        data = _strip(dst.read_bytes())
        details["size"] = size_breakdown(data, len(model))
        return Variant(data, details, [])


def to_fp16(model: bytes) -> Variant:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    # The converter appends its input Casts at the end of the node list; ONNX requires
    # topological order (the checker, and so the registry, rejects the graph otherwise).
    _sort_topologically(converted.graph)
    return Variant(
        converted.SerializeToString(),
        {"keep_io_types": True},
        [
            "fp16 pays off only where the execution provider computes in fp16 (GPU/NPU); "
            "on CPU providers it mostly halves the size"
        ],
    )


def _sort_topologically(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise OptimizationError("the converted graph has a cycle or an undefined input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        placed = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in placed]
    del graph.node[:]
    graph.node.extend(ordered)


def prune(model: bytes, *, sparsity: float, scope: str, min_elements: int = 16) -> Variant:
    """Zero the smallest-magnitude weights of every float initializer of rank >= 2 (per
    tensor, or one threshold over all of them with ``scope="global"``)."""
    if not 0 < sparsity < 1:
        raise OptimizationError("sparsity must be between 0 and 1 (exclusive), e.g. 0.5")
    proto = onnx.load_from_string(model)
    constants_to_initializers(proto)  # Constant weights are weights too
    targets = [
        t
        for t in proto.graph.initializer
        if len(t.dims) >= 2
        and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        and int(np.prod(t.dims)) >= min_elements
    ]
    if not targets:
        raise OptimizationError("the model has no weight matrices to prune")
    arrays = {t.name: numpy_helper.to_array(t) for t in targets}
    if scope == "global":
        everything = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
        k = round(sparsity * everything.size)
        threshold = np.partition(everything, k - 1)[k - 1] if k else -1.0
        masks = {n: np.abs(a) > threshold for n, a in arrays.items()}
    elif scope == "tensor":
        masks = {}
        for n, a in arrays.items():
            flat = np.abs(a).ravel()
            k = round(sparsity * flat.size)
            order = np.argsort(flat, kind="stable")
            mask = np.ones(flat.size, dtype=bool)
            mask[order[:k]] = False
            masks[n] = mask.reshape(a.shape)
    else:
        raise OptimizationError(f"unknown pruning scope {scope!r} (tensor or global)")
    zeros = total = 0
    per_tensor = {}
    for t in targets:
        pruned = arrays[t.name] * masks[t.name]
        t.CopyFrom(numpy_helper.from_array(pruned.astype(arrays[t.name].dtype), t.name))
        z = int(np.count_nonzero(pruned == 0))
        zeros, total = zeros + z, total + pruned.size
        per_tensor[t.name] = round(z / pruned.size, 4)
    data = proto.SerializeToString()
    return Variant(
        data,
        {
            "requested_sparsity": sparsity,
            "achieved_sparsity": round(zeros / total, 4),
            "scope": scope,
            "pruned_tensors": len(targets),
            "per_tensor": per_tensor,
            "compressed_bytes": size_compressed(data),
        },
        [
            "pruning alone does not shrink a dense ONNX file; the size win shows compressed "
            "(compressed_bytes) or combined with quantization"
        ],
    )


def derive(
    model: bytes,
    method: str,
    params: Mapping[str, Any],
    *,
    samples: list[Feeds] | None,
) -> Variant:
    if method in ("dynamic-int8", "static-int8"):
        per_channel = params.get("per_channel")
        op_types = params.get("op_types")
        return quantize(
            model,
            method,
            samples=samples,
            per_channel=None if per_channel is None else bool(per_channel),
            target=str(params.get("target", CPU)),
            quant_format=None if params.get("format") is None else str(params["format"]),
            calibration=str(params.get("calibration", "minmax")),
            op_types=None if op_types is None else [str(o) for o in op_types],
        )
    if method == "fp16":
        return to_fp16(model)
    if method == "prune":
        return prune(
            model,
            sparsity=float(params.get("sparsity", 0.5)),
            scope=str(params.get("scope", "tensor")),
        )
    raise OptimizationError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
