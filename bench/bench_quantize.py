"""Static int8 on real CNNs: the variant's size and p50 latency as ratios to its fp32
parent, and top-1 agreement, for two pipelines:

  (before) onnxruntime's ``quantize_static`` on the model as it comes, QDQ, per-tensor:
           what ``static-int8`` did before issue #17;
  (after)  ``controller.optimizations.optimize.quantize``: Constant weights moved to
           initializers, ``quant_pre_process``, per-channel Conv weights, QOperator and
           the CPU provider's fast int8 operator types.

Models: the test CNN (``samples.build_cnn``, weights in initializers), the Constant-
weights CNN (``samples.build_constant_cnn``, paddle2onnx's way), and, when the
rapidocr-onnxruntime wheel is installed (``scripts/test`` installs it), the PP-OCR text
direction classifier (Constant weights, input ``[?, 3, ?, ?]``), text detector and text
recognizer (top-1 agreement over its softmax per step).
Inputs are uniform [0, 1) images at each model's natural shape; the first ``--calibrate``
calibrate, the next ``--compare`` are compared. Latency: ``optimize.compare``, parent and
variant alternating in one process, 1 intra-op thread each.

Run: python bench/bench_quantize.py [--calibrate 16] [--compare 8] [--runs 30]"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from controller.optimizations import compare, optimize
from controller.registry import samples

Feeds = dict[str, np.ndarray]


def _packaged(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def models() -> list[tuple[str, bytes, str, tuple[int, ...]]]:
    """(label, model, input name, input shape)."""
    out: list[tuple[str, bytes, str, tuple[int, ...]]] = [
        ("test CNN (64 ch, initializers)", samples.build_cnn(channels=64), "image", (1, 3, 32, 32)),
        (
            "Constant-weights CNN (64 ch, 4 blocks)",
            samples.build_constant_cnn(channels=64, blocks=4),
            "x",
            (1, 3, 48, 192),
        ),
    ]
    for label, relative, shape in (
        (
            "PP-OCR cls (Constant weights, [?,3,?,?])",
            "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            (1, 3, 48, 192),
        ),
        ("PP-OCRv4 det (Constant weights)", "ch_PP-OCRv4_det_infer.onnx", (1, 3, 160, 160)),
        ("PP-OCRv4 rec (SVTR, softmax per step)", "ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
    ):
        path = _packaged("rapidocr_onnxruntime", f"models/{relative}")
        if path is not None:
            out.append((label, path.read_bytes(), "x", shape))
    return out


def before(model: bytes, calibration: list[Feeds]) -> bytes:
    """``static-int8`` as it was: quantize_static on the unprepared model, QDQ."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(model)
        quantize_static(
            src,
            dst,
            optimize._Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
        )
        return dst.read_bytes()


def after(model: bytes, calibration: list[Feeds]) -> bytes:
    return optimize.quantize(model, "static-int8", samples=calibration).data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", type=int, default=16)
    parser.add_argument("--compare", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    pipelines: list[tuple[str, Callable[[bytes, list[Feeds]], bytes]]] = [
        ("before", before),
        ("after", after),
    ]
    print(f"{'model':44} {'pipeline':8} {'size':>7} {'p50':>7} {'top-1':>6}  verdict")
    for label, model, name, shape in models():
        rng = np.random.default_rng(0)
        feeds = [
            {name: rng.random(shape, dtype=np.float32)}
            for _ in range(args.calibrate + args.compare)
        ]
        calibration, held_out = feeds[: args.calibrate], feeds[args.calibrate :]
        for pipeline, derive in pipelines:
            try:
                variant = derive(model, calibration)
                report = compare.compare(model, variant, held_out, latency_runs=args.runs)
            except Exception as exc:  # the old pipeline breaks some models outright
                print(f"{label:44} {pipeline:8} failed: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            verdict = report["verdict"]
            print(
                f"{label:44} {pipeline:8} x{report['size_ratio']:<6} "
                f"x{report['latency_ratio']['p50']:<6} {report['top1_agreement']!s:>6}  "
                + ("recommended" if verdict["recommended"] else "; ".join(verdict["reasons"])),
                flush=True,
            )


if __name__ == "__main__":
    main()
