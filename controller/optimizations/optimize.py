"""Model optimization: derive a smaller or faster variant of an ONNX model and prove,
with numbers, how close it stays to the original.

Methods: int8 dynamic quantization (MatMul/recurrent-heavy models), int8 static
quantization in QDQ format with calibration data (CNNs), fp16 conversion, and magnitude
pruning to a target sparsity. The comparison runs both models on the same inputs in one
process: max and mean absolute error per output, allclose at given tolerances, top-1
agreement for classifier-like outputs, size ratios and side-by-side latency."""

from __future__ import annotations

import io
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from node_agent.runtimes import InputHints, OnnxRunner, TensorSpec, generate_inputs

METHODS = ("dynamic-int8", "static-int8", "fp16", "prune")
Feeds = dict[str, np.ndarray]


class OptimizationError(ValueError):
    pass


@dataclass
class Variant:
    data: bytes
    details: dict[str, Any]
    warnings: list[str]


# ---------------------------------------------------------------- calibration / samples


def load_samples(npz: bytes, specs: Sequence[TensorSpec]) -> list[Feeds]:
    """Sample inputs uploaded as an ``.npz`` of arrays named like the model's inputs,
    each with a leading sample axis: ``image: [N, 1, 3, 32, 32]`` gives N feeds."""
    try:
        arrays = dict(np.load(io.BytesIO(npz), allow_pickle=False))
    except Exception as exc:
        raise OptimizationError(f"calibration file is not a readable .npz: {exc}") from exc
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise OptimizationError(
            f"calibration .npz lacks input(s) {missing}; it has {sorted(arrays)} "
            "(one array per model input, leading axis = samples)"
        )
    counts = {n: arrays[n].shape[0] for n in names}
    if len(set(counts.values())) != 1:
        raise OptimizationError(f"calibration arrays disagree on the sample count: {counts}")
    n = next(iter(counts.values()))
    return [{name: np.ascontiguousarray(arrays[name][i]) for name in names} for i in range(n)]


def generated_samples(specs: Sequence[TensorSpec], count: int, default_dim: int) -> list[Feeds]:
    hints = InputHints(dims={}, shapes={}, values={})
    return [generate_inputs(specs, hints, default_dim=default_dim, seed=i) for i in range(count)]


# ---------------------------------------------------------------- methods


def _size_compressed(data: bytes) -> int:
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


def quantize(
    model: bytes, method: str, *, samples: list[Feeds] | None, per_channel: bool
) -> Variant:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(model)
        if method == "dynamic-int8":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
        else:
            assert samples is not None
            quantize_static(
                src,
                dst,
                _Reader(samples),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=CalibrationMethod.MinMax,
            )
        return Variant(dst.read_bytes(), {"per_channel": per_channel}, [])


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
            "compressed_bytes": _size_compressed(data),
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
        return quantize(
            model, method, samples=samples, per_channel=bool(params.get("per_channel", False))
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


# ---------------------------------------------------------------- comparison


def _percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def compare(
    original: bytes,
    variant: bytes,
    samples: list[Feeds],
    *,
    rtol: float = 1e-2,
    atol: float = 1e-3,
    latency_runs: int = 30,
) -> dict[str, Any]:
    """Both models on the same inputs, in this process. Latency is measured side by side,
    alternating runs, so both see the same machine state."""
    a, b = OnnxRunner(original, threads=1), OnnxRunner(variant, threads=1)
    outputs: dict[str, dict[str, Any]] = {}
    agree = classified = 0
    for feeds in samples:
        ra, rb = a.run(feeds), b.run(feeds)
        for name, va in ra.items():
            vb = rb[name].astype(va.dtype, copy=False)
            diff = np.abs(va.astype(np.float64) - vb.astype(np.float64))
            o = outputs.setdefault(
                name, {"max_abs_error": 0.0, "sum_abs": 0.0, "n": 0, "allclose": True}
            )
            o["max_abs_error"] = max(o["max_abs_error"], float(diff.max(initial=0.0)))
            o["sum_abs"] += float(diff.sum())
            o["n"] += diff.size
            o["allclose"] = o["allclose"] and bool(np.allclose(vb, va, rtol=rtol, atol=atol))
            if va.ndim == 2 and va.shape[1] > 1:
                classified += va.shape[0]
                agree += int(np.sum(np.argmax(va, axis=1) == np.argmax(vb, axis=1)))
    report_outputs = {
        name: {
            "max_abs_error": round(o["max_abs_error"], 6),
            "mean_abs_error": round(o["sum_abs"] / max(o["n"], 1), 6),
            "allclose": o["allclose"],
        }
        for name, o in outputs.items()
    }
    lat_a, lat_b = [], []
    feeds = samples[0]
    for _ in range(3):
        a.run(feeds)
        b.run(feeds)
    for _ in range(latency_runs):
        t0 = time.perf_counter_ns()
        a.run(feeds)
        t1 = time.perf_counter_ns()
        b.run(feeds)
        t2 = time.perf_counter_ns()
        lat_a.append((t1 - t0) / 1e6)
        lat_b.append((t2 - t1) / 1e6)
    pa50, pa95 = _percentiles(lat_a)
    pb50, pb95 = _percentiles(lat_b)
    return {
        "samples": len(samples),
        "tolerances": {"rtol": rtol, "atol": atol},
        "outputs": report_outputs,
        "max_abs_error": max((o["max_abs_error"] for o in report_outputs.values()), default=0.0),
        "allclose": all(o["allclose"] for o in report_outputs.values()),
        "top1_agreement": round(agree / classified, 4) if classified else None,
        "size_bytes": {"original": len(original), "variant": len(variant)},
        "size_ratio": round(len(variant) / len(original), 4),
        "compressed_size_ratio": round(_size_compressed(variant) / _size_compressed(original), 4),
        "latency_ms": {
            "original": {"p50": round(pa50, 4), "p95": round(pa95, 4)},
            "variant": {"p50": round(pb50, 4), "p95": round(pb95, 4)},
        },
        "latency_ratio": {"p50": round(pb50 / pa50, 4), "p95": round(pb95 / pa95, 4)},
    }
