"""Small, real ONNX models built in code with the ``onnx`` helper API: the demo pushes
them and the tests use them, so nothing is ever downloaded. Weights are deterministic."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _finish(graph: onnx.GraphProto, producer: str, opset: int = OPSET) -> bytes:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer
    )
    model.ir_version = 8  # readable by every onnxruntime of the last few years
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def build_cnn(*, classes: int = 10, channels: int = 8, size: int = 32, seed: int = 0) -> bytes:
    """Image classifier: input ``image`` float32 [batch, 3, size, size] with a dynamic
    batch; Conv-Relu-MaxPool-Conv-Relu-GlobalAveragePool-Flatten-Gemm-Softmax; output
    ``probabilities`` [batch, classes]."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = [
        _init("w1", (rng.standard_normal((channels, 3, 3, 3)) * 0.2).astype(f32)),
        _init("b1", (rng.standard_normal(channels) * 0.1).astype(f32)),
        _init("w2", (rng.standard_normal((channels * 2, channels, 3, 3)) * 0.1).astype(f32)),
        _init("b2", (rng.standard_normal(channels * 2) * 0.1).astype(f32)),
        _init("fc_w", (rng.standard_normal((channels * 2, classes)) * 0.2).astype(f32)),
        _init("fc_b", (rng.standard_normal(classes) * 0.1).astype(f32)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "edgefleet-cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    return _finish(graph, "edgefleet.samples.cnn")


def build_constant_cnn(
    *, classes: int = 10, channels: int = 32, blocks: int = 2, seed: int = 0
) -> bytes:
    """A mobile-style CNN written the way paddle2onnx writes one: every weight is a
    ``Constant`` node (no initializers), opset 11, and the input ``x`` float32
    ``[?, 3, ?, ?]`` (an unset batch dim and two unnamed ``?`` dims: any height and
    width, independently). Conv-BatchNorm-Relu stem, then ``blocks`` residual blocks
    (depthwise Conv, pointwise Conv, BatchNorm, Add), GlobalAveragePool, Flatten, Gemm,
    Softmax; output ``probabilities`` [?, classes]."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: np.ndarray) -> str:
        nodes.append(
            helper.make_node(
                "Constant", [], [name], value=numpy_helper.from_array(array.astype(f32), name)
            )
        )
        return name

    def conv_bn(x: str, out: str, c_in: int, c_out: int, k: int, group: int = 1) -> str:
        w = const(
            f"{out}_w",
            rng.standard_normal((c_out, c_in // group, k, k)) * (2 / (c_in * k * k / group)) ** 0.5,
        )
        conv = f"{out}_conv"
        nodes.append(helper.make_node("Conv", [x, w], [conv], pads=[k // 2] * 4, group=group))
        bn = [
            const(f"{out}_scale", 1 + rng.standard_normal(c_out) * 0.1),
            const(f"{out}_bias", rng.standard_normal(c_out) * 0.1),
            const(f"{out}_mean", rng.standard_normal(c_out) * 0.1),
            const(f"{out}_var", 1 + rng.random(c_out) * 0.1),
        ]
        nodes.append(helper.make_node("BatchNormalization", [conv, *bn], [out]))
        return out

    h = conv_bn("x", "stem", 3, channels, 3)
    nodes.append(helper.make_node("Relu", [h], ["stem_r"]))
    h = "stem_r"
    for b in range(blocks):
        d = conv_bn(h, f"b{b}_dw", channels, channels, 3, group=channels)
        nodes.append(helper.make_node("Relu", [d], [f"b{b}_dwr"]))
        p = conv_bn(f"b{b}_dwr", f"b{b}_pw", channels, channels, 1)
        nodes.append(helper.make_node("Add", [h, p], [f"b{b}_add"]))
        nodes.append(helper.make_node("Relu", [f"b{b}_add"], [f"b{b}_out"]))
        h = f"b{b}_out"
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc_w = const("fc_w", rng.standard_normal((channels, classes)) * (1 / channels) ** 0.5)
    fc_b = const("fc_b", rng.standard_normal(classes) * 0.1)
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, "?", "?"])
    graph = helper.make_graph(
        nodes,
        "edgefleet-constant-cnn",
        [image],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])],
    )
    return _finish(graph, "edgefleet.samples.constant_cnn", opset=11)


def cnn_parameter_count(*, classes: int = 10, channels: int = 8) -> int:
    return (
        channels * 3 * 9
        + channels
        + channels * 2 * channels * 9
        + channels * 2
        + channels * 2 * classes
        + classes
    )


def build_sequence_scorer(*, features: int = 16, hidden: int = 32, seed: int = 0) -> bytes:
    """Several inputs and a symbolic non-batch dimension: ``tokens`` float32
    [batch, seq, features] and ``mask`` float32 [batch, seq] (both share the named dim
    ``seq``); MatMul-Relu, masked mean over ``seq``, MatMul; output ``score`` [batch, 1]."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = [
        _init("w_in", (rng.standard_normal((features, hidden)) * 0.2).astype(f32)),
        _init("w_out", (rng.standard_normal((hidden, 1)) * 0.2).astype(f32)),
        _init("axes_last", np.array([-1], dtype=np.int64)),
        _init("axes_seq", np.array([1], dtype=np.int64)),
        _init("eps", np.array([1e-6], dtype=f32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["tokens", "w_in"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Unsqueeze", ["mask", "axes_last"], ["m3"]),
        helper.make_node("Mul", ["hr", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axes_seq"], ["hsum"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axes_seq"], ["msum"], keepdims=0),
        helper.make_node("Add", ["msum", "eps"], ["msafe"]),
        helper.make_node("Div", ["hsum", "msafe"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w_out"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "edgefleet-sequence-scorer",
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", features]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    return _finish(graph, "edgefleet.samples.sequence_scorer")


def build_failing_model() -> bytes:
    """Passes the ONNX checker but fails at run time in every runtime: a Reshape to a
    shape that cannot hold the input's element count."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "edgefleet-broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [_init("shape", np.array([4, 4], dtype=np.int64))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return bytes(model.SerializeToString())
