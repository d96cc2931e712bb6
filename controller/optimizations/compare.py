"""The comparison of a variant against its parent: both models on the same inputs in one
process (errors per output, allclose, top-1 agreement, sizes, side-by-side latency), and
the verdict whether the variant is worth shipping."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from controller.optimizations.optimize import Feeds, size_compressed
from node_agent.runtimes import (
    open_runner,
)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


MIN_AGREEMENT = 0.99
"""The top-1 agreement below which the report calls a variant not worth shipping (a
rollout's ``spec.comparison`` may ask for more, or less)."""
LATENCY_NOISE = 0.05
"""How much slower (p50) than its parent a variant may measure and still count as not
slower: side-by-side runs on a shared machine differ by a few percent between two runs
of the same model."""


def verdict(report: Mapping[str, Any], *, min_agreement: float = MIN_AGREEMENT) -> dict[str, Any]:
    """Whether the variant of this comparison ``report`` is worth shipping in place of
    its parent (smaller, not slower, agreeing at ``min_agreement`` top-1), and every
    reason it is not."""
    reasons: list[str] = []
    size = report["size_ratio"]
    if size >= 1:
        what = "bigger than" if size > 1 else "no smaller than"
        reasons.append(f"it is {what} its parent (size x{size})")
    p50 = report["latency_ratio"]["p50"]
    if p50 > 1 + LATENCY_NOISE:
        reasons.append(f"it is slower than its parent on this machine (p50 x{p50})")
    agreement = report.get("top1_agreement")
    if agreement is not None and agreement < min_agreement:
        reasons.append(
            f"its top-1 predictions agree with its parent's on {agreement} of the samples "
            f"(below {min_agreement})"
        )
    elif agreement is None and not report["allclose"]:
        reasons.append(
            f"its outputs differ from its parent's beyond the tolerances (max abs error "
            f"{report['max_abs_error']})"
        )
    return {
        "recommended": not reasons,
        "bigger": size >= 1,
        "slower": p50 > 1 + LATENCY_NOISE,
        "reasons": reasons,
    }


def _classes(value: np.ndarray) -> np.ndarray | None:
    """``value`` as rows of class probabilities whose argmax is a prediction, or
    ``None``: an output whose last axis (of more than one entry) holds probability
    distributions, non-negative and summing to 1: a classifier's softmax per sample
    (``[batch, classes]``) or per position (a text recognizer's ``[batch, steps,
    classes]``). Other outputs are compared by their error alone: the argmax of a
    landmark regressor's ``[1, 63]`` coordinates or a box regressor's ``[1, anchors,
    16]`` predicts nothing, and agreeing on it would hide a large error."""
    if value.ndim < 2 or value.shape[-1] < 2 or value.dtype.kind != "f":
        return None
    rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
    if rows.min(initial=0.0) >= 0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
        return rows
    return None


def compare(
    original: bytes,
    variant: bytes,
    samples: list[Feeds],
    *,
    fmt: str = "onnx",
    rtol: float = 1e-2,
    atol: float = 1e-3,
    latency_runs: int = 30,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """Both models on the same inputs, in this process, in the runtime of their format
    (onnxruntime, LiteRT). Latency is measured side by side, alternating runs, so both
    see the same machine state. The report ends with its :func:`verdict`: a variant
    bigger or slower than its parent says so."""
    a, b = open_runner(original, fmt, threads=1), open_runner(variant, fmt, threads=1)
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
            if (rows := _classes(va)) is not None:
                classified += rows.shape[0]
                other = vb.reshape(rows.shape)
                agree += int(np.sum(np.argmax(rows, axis=1) == np.argmax(other, axis=1)))
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
    report = {
        "samples": len(samples),
        "tolerances": {"rtol": rtol, "atol": atol},
        "outputs": report_outputs,
        "max_abs_error": max((o["max_abs_error"] for o in report_outputs.values()), default=0.0),
        "allclose": all(o["allclose"] for o in report_outputs.values()),
        "top1_agreement": round(agree / classified, 4) if classified else None,
        "size_bytes": {"original": len(original), "variant": len(variant)},
        "size_ratio": round(len(variant) / len(original), 4),
        "compressed_size_ratio": round(size_compressed(variant) / size_compressed(original), 4),
        "latency_ms": {
            "original": {"p50": round(pa50, 4), "p95": round(pa95, 4)},
            "variant": {"p50": round(pb50, 4), "p95": round(pb95, 4)},
        },
        "latency_ratio": {"p50": round(pb50 / pa50, 4), "p95": round(pb95 / pa95, 4)},
    }
    report["verdict"] = verdict(report, min_agreement=min_agreement)
    return report
