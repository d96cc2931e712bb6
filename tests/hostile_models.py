"""Small models that ask for far more than they are: the probe's resource limits must
stop them (node_agent/probe.py, apply_limits)."""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from onnx import GraphProto, TensorProto, helper, numpy_helper

from controller.registry.samples import OPSET
from controller.registry.tflite_builder import _activation_options, _Graph

GIB = 1024**3


def _onnx(graph: GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def memory_bomb(elements: int = 10**9) -> bytes:
    """~120 bytes of ONNX, no inputs: ``ConstantOfShape`` filling ``elements`` float32s
    (10^9: 4 GB, twice the default limit, refused before a page is touched)."""
    shape = numpy_helper.from_array(np.array([elements], dtype=np.int64), "shape")
    fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0])
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], value=fill)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])
    return _onnx(helper.make_graph([node], "memory-bomb", [], [out], initializer=[shape]))


def cpu_burner(size: int = 2048, depth: int = 64) -> bytes:
    """``x @ w @ w ...`` over [size, size] float32 (``w`` zeros, made by ConstantOfShape
    so the file stays small): ~2·size³·depth FLOP a run, 1.1 TFLOP by default, many seconds
    of CPU on one thread even on a fast core, with finite outputs (all zeros)."""
    shape = numpy_helper.from_array(np.array([size, size], dtype=np.int64), "shape")
    zero = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=zero)]
    prev = "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    return _onnx(helper.make_graph(nodes, "cpu-burner", [x], [y], initializer=[shape]))


def litert_memory_bomb(elements: int = 10**9) -> bytes:
    """A few hundred bytes of TFLite: ``a + b`` over [1, elements] float32, so
    allocate_tensors wants three 4 GB tensors."""
    g = _Graph()
    a = g.tensor("a", [1, elements])
    b = g.tensor("b", [1, elements])
    out = g.tensor("out", [1, elements])
    g.op(
        schema.BuiltinOperator.ADD,
        [a, b],
        [out],
        schema.BuiltinOptions.AddOptions,
        _activation_options(schema.AddOptionsT),
    )
    return g.finish([a, b], [out], "edgefleet test: memory bomb")
