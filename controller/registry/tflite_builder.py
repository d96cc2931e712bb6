"""Build small, real TFLite models in code (for tests and the product demo).

The models are written with LiteRT's generated flatbuffer object API, so they are the
same bytes a converter would produce for the same graph, and they load and run in
``ai_edge_litert.interpreter.Interpreter``. Weights come from
``numpy.random.default_rng(seed)``, so a model is a pure function of its arguments,
and :func:`reference_mlp` / :func:`reference_two_inputs` compute the same forward pass
in numpy for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from controller.registry.tflite_reader import FILE_IDENTIFIER

__all__ = ["build_tflite_mlp", "build_tflite_two_inputs", "reference_mlp", "reference_two_inputs"]

_SCHEMA_VERSION = 3


def _mlp_weights(
    in_features: int, hidden: int, out_features: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(w1 [hidden, in], b1 [hidden], w2 [out, hidden], b2 [out]), float32."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((hidden, in_features)) / np.sqrt(in_features)
    b1 = rng.standard_normal(hidden) * 0.1
    w2 = rng.standard_normal((out_features, hidden)) / np.sqrt(hidden)
    b2 = rng.standard_normal(out_features) * 0.1
    f32 = np.float32
    return w1.astype(f32), b1.astype(f32), w2.astype(f32), b2.astype(f32)


def _two_inputs_scale(features: int, seed: int) -> np.ndarray:
    scale: np.ndarray = np.random.default_rng(seed).uniform(0.5, 2.0, features)
    return scale.astype(np.float32)


def reference_mlp(
    x: np.ndarray, *, in_features: int, hidden: int, out_features: int, seed: int
) -> np.ndarray:
    """The forward pass of :func:`build_tflite_mlp`, in float64 numpy, as float32."""
    w1, b1, w2, b2 = (
        a.astype(np.float64) for a in _mlp_weights(in_features, hidden, out_features, seed)
    )
    h = np.maximum(np.asarray(x, dtype=np.float64) @ w1.T + b1, 0.0)
    logits = h @ w2.T + b2
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return probabilities.astype(np.float32)


def reference_two_inputs(
    a: np.ndarray, b: np.ndarray, *, features: int = 4, seed: int = 0
) -> np.ndarray:
    """The forward pass of :func:`build_tflite_two_inputs`: ``(a + b) * scale``."""
    scale = _two_inputs_scale(features, seed).astype(np.float64)
    total = np.asarray(a, dtype=np.float64) + np.asarray(b, dtype=np.float64)
    return (total * scale).astype(np.float32)


class _Graph:
    """Accumulates tensors, buffers and operators of a single-subgraph model."""

    def __init__(self) -> None:
        self.buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.tensors: list[Any] = []
        self.operators: list[Any] = []
        self.opcodes: list[int] = []

    def tensor(
        self, name: str, shape: Sequence[int], *, signature: Sequence[int] | None = None
    ) -> int:
        t = schema.TensorT()
        t.name = name
        t.type = schema.TensorType.FLOAT32
        t.shape = list(shape)
        if signature is not None:
            t.shapeSignature = list(signature)
        t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, value: np.ndarray) -> int:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(value.astype("<f4").tobytes(), dtype=np.uint8)
        self.buffers.append(buffer)
        index = self.tensor(name, value.shape)
        self.tensors[index].buffer = len(self.buffers) - 1
        return index

    def op(
        self, code: int, inputs: list[int], outputs: list[int], options_type: int, options: Any
    ) -> None:
        if code not in self.opcodes:
            self.opcodes.append(code)
        op = schema.OperatorT()
        op.opcodeIndex = self.opcodes.index(code)
        op.inputs = inputs
        op.outputs = outputs
        op.builtinOptionsType = options_type
        op.builtinOptions = options
        self.operators.append(op)

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        subgraph = schema.SubGraphT()
        subgraph.tensors = self.tensors
        subgraph.inputs = inputs
        subgraph.outputs = outputs
        subgraph.operators = self.operators
        subgraph.name = "main"
        model = schema.ModelT()
        model.version = _SCHEMA_VERSION
        model.description = description
        model.subgraphs = [subgraph]
        model.buffers = self.buffers
        model.operatorCodes = []
        for code in self.opcodes:
            opcode = schema.OperatorCodeT()
            opcode.builtinCode = code
            # Readers older than schema 3a only see the int8 field: 127 means "look at
            # builtin_code" (BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES).
            opcode.deprecatedBuiltinCode = min(code, 127)
            opcode.version = 1
            model.operatorCodes.append(opcode)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _activation_options(kind: Any, activation: int = 0) -> Any:
    options = kind()
    options.fusedActivationFunction = activation
    return options


def build_tflite_mlp(
    *,
    in_features: int = 8,
    hidden: int = 16,
    out_features: int = 4,
    seed: int = 0,
    dynamic_batch: bool = True,
) -> bytes:
    """``input [batch, in] -> FC+RELU -> FC -> SOFTMAX -> probabilities [batch, out]``.

    The batch is 1 in ``shape``; with ``dynamic_batch`` the ``shape_signature`` says -1 so
    the interpreter accepts ``resize_tensor_input`` to any batch size.
    """
    w1, b1, w2, b2 = _mlp_weights(in_features, hidden, out_features, seed)
    g = _Graph()

    def activation(name: str, features: int) -> int:
        signature = [-1, features] if dynamic_batch else None
        return g.tensor(name, [1, features], signature=signature)

    x = activation("input", in_features)
    h = activation("dense_1/Relu", hidden)
    logits = activation("dense_2/BiasAdd", out_features)
    probabilities = activation("probabilities", out_features)
    fc, relu = schema.BuiltinOperator.FULLY_CONNECTED, schema.ActivationFunctionType.RELU
    fc_options = schema.BuiltinOptions.FullyConnectedOptions
    g.op(
        fc,
        [x, g.constant("dense_1/kernel", w1), g.constant("dense_1/bias", b1)],
        [h],
        fc_options,
        _activation_options(schema.FullyConnectedOptionsT, relu),
    )
    g.op(
        fc,
        [h, g.constant("dense_2/kernel", w2), g.constant("dense_2/bias", b2)],
        [logits],
        fc_options,
        _activation_options(schema.FullyConnectedOptionsT),
    )
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    g.op(
        schema.BuiltinOperator.SOFTMAX,
        [logits],
        [probabilities],
        schema.BuiltinOptions.SoftmaxOptions,
        softmax,
    )
    return g.finish(
        [x], [probabilities], f"edgefleet demo MLP {in_features}-{hidden}-{out_features}"
    )


def build_tflite_two_inputs(*, features: int = 4, seed: int = 0) -> bytes:
    """``out = (a + b) * scale`` with inputs ``a`` and ``b`` of shape [1, features].

    ``scale`` is a constant [features] vector (broadcast over the batch).
    """
    g = _Graph()
    a = g.tensor("a", [1, features])
    b = g.tensor("b", [1, features])
    total = g.tensor("sum", [1, features])
    out = g.tensor("out", [1, features])
    scale = g.constant("scale", _two_inputs_scale(features, seed))
    g.op(
        schema.BuiltinOperator.ADD,
        [a, b],
        [total],
        schema.BuiltinOptions.AddOptions,
        _activation_options(schema.AddOptionsT),
    )
    g.op(
        schema.BuiltinOperator.MUL,
        [total, scale],
        [out],
        schema.BuiltinOptions.MulOptions,
        _activation_options(schema.MulOptionsT),
    )
    return g.finish([a, b], [out], "edgefleet demo: (a + b) * scale")
