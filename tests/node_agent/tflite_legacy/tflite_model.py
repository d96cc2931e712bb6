"""Small, real TFLite models written with the ``flatbuffers`` package alone.

The project's builder (:mod:`controller.registry.tflite_builder`) packs models with
LiteRT's generated schema module, which comes with ``ai-edge-litert``: installing that
here would put LiteRT first in :func:`node_agent.runtimes.load_tflite_interpreter`, and
these tests exist to run on ``tflite_runtime``. So this module writes the few tables a
model needs by hand, slot by slot (numbers from TFLite's ``schema.fbs``); the weights
come from a seed, and :func:`reference_mlp` / :func:`reference_two_inputs` compute the
same forward passes in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import flatbuffers
import numpy as np

# BuiltinOperator, BuiltinOptions (the union's type tag) and ActivationFunctionType.
ADD, FULLY_CONNECTED, MUL, SOFTMAX = 0, 9, 18, 25
FULLY_CONNECTED_OPTIONS, SOFTMAX_OPTIONS, ADD_OPTIONS, MUL_OPTIONS = 8, 9, 11, 21
NONE, RELU = 0, 1
FLOAT32 = 0  # TensorType


def mlp_weights(
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


def reference_mlp(
    x: np.ndarray, *, in_features: int = 8, hidden: int = 16, out_features: int = 4, seed: int = 0
) -> np.ndarray:
    """:func:`build_mlp`'s forward pass in float64, as float32."""
    w1, b1, w2, b2 = (
        a.astype(np.float64) for a in mlp_weights(in_features, hidden, out_features, seed)
    )
    h = np.maximum(np.asarray(x, dtype=np.float64) @ w1.T + b1, 0.0)
    logits = h @ w2.T + b2
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return probabilities.astype(np.float32)


def two_inputs_scale(features: int, seed: int) -> np.ndarray:
    scale: np.ndarray = np.random.default_rng(seed).uniform(0.5, 2.0, features)
    return scale.astype(np.float32)


def reference_two_inputs(
    a: np.ndarray, b: np.ndarray, *, features: int = 4, seed: int = 0
) -> np.ndarray:
    """:func:`build_two_inputs`' forward pass: ``(a + b) * scale``."""
    scale = two_inputs_scale(features, seed).astype(np.float64)
    total = np.asarray(a, dtype=np.float64) + np.asarray(b, dtype=np.float64)
    return (total * scale).astype(np.float32)


class _Graph:
    """One subgraph's tensors, constant buffers and operators, written as tables as they
    come (a flatbuffer is built back to front: children before the table that refers to
    them)."""

    def __init__(self) -> None:
        self.b = flatbuffers.Builder(4096)
        self.buffers = [self._buffer(b"")]  # buffer 0: the empty sentinel
        self.tensors: list[int] = []
        self.operators: list[int] = []
        self.opcodes: list[int] = []

    def _ints(self, values: Sequence[int]) -> int:
        return int(self.b.CreateNumpyVector(np.asarray(values, dtype="<i4")))

    def _offsets(self, offsets: Sequence[int]) -> int:
        self.b.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            self.b.PrependUOffsetTRelative(offset)
        return int(self.b.EndVector())

    def _buffer(self, data: bytes) -> int:
        vector = None
        if data:
            # Buffer.data is `force_align: 16` in the schema.
            self.b.StartVector(1, len(data), 16)
            self.b.head -= len(data)
            self.b.Bytes[self.b.head : self.b.head + len(data)] = data
            vector = self.b.EndVector()
        self.b.StartObject(3)
        if vector is not None:
            self.b.PrependUOffsetTRelativeSlot(0, vector, 0)
        return int(self.b.EndObject())

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        *,
        signature: Sequence[int] | None = None,
        buffer: int = 0,
    ) -> int:
        name_offset = self.b.CreateString(name)
        shape_offset = self._ints(shape)
        signature_offset = self._ints(signature) if signature is not None else None
        self.b.StartObject(8)
        self.b.PrependUOffsetTRelativeSlot(0, shape_offset, 0)
        self.b.PrependInt8Slot(1, FLOAT32, 0)
        self.b.PrependUint32Slot(2, buffer, 0)
        self.b.PrependUOffsetTRelativeSlot(3, name_offset, 0)
        if signature_offset is not None:
            self.b.PrependUOffsetTRelativeSlot(7, signature_offset, 0)
        self.tensors.append(self.b.EndObject())
        return len(self.tensors) - 1

    def constant(self, name: str, value: np.ndarray) -> int:
        self.buffers.append(self._buffer(value.astype("<f4").tobytes()))
        return self.tensor(name, value.shape, buffer=len(self.buffers) - 1)

    def op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int,
        *,
        activation: int = NONE,
        beta: float | None = None,
    ) -> None:
        if code not in self.opcodes:
            self.opcodes.append(code)
        # Every options table used here has fused_activation_function in slot 0, except
        # SoftmaxOptions, whose slot 0 is beta.
        self.b.StartObject(1)
        if beta is not None:
            self.b.PrependFloat32Slot(0, beta, 0.0)
        else:
            self.b.PrependInt8Slot(0, activation, 0)
        options = self.b.EndObject()
        inputs_offset, outputs_offset = self._ints(inputs), self._ints(outputs)
        self.b.StartObject(5)
        self.b.PrependUint32Slot(0, self.opcodes.index(code), 0)
        self.b.PrependUOffsetTRelativeSlot(1, inputs_offset, 0)
        self.b.PrependUOffsetTRelativeSlot(2, outputs_offset, 0)
        self.b.PrependUint8Slot(3, options_type, 0)
        self.b.PrependUOffsetTRelativeSlot(4, options, 0)
        self.operators.append(self.b.EndObject())

    def finish(self, inputs: Sequence[int], outputs: Sequence[int], description: str) -> bytes:
        b = self.b
        tensors, operators = self._offsets(self.tensors), self._offsets(self.operators)
        inputs_offset, outputs_offset = self._ints(inputs), self._ints(outputs)
        name = b.CreateString("main")
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, tensors, 0)
        b.PrependUOffsetTRelativeSlot(1, inputs_offset, 0)
        b.PrependUOffsetTRelativeSlot(2, outputs_offset, 0)
        b.PrependUOffsetTRelativeSlot(3, operators, 0)
        b.PrependUOffsetTRelativeSlot(4, name, 0)
        subgraphs = self._offsets([b.EndObject()])
        opcodes = []
        for code in self.opcodes:
            b.StartObject(4)
            b.PrependInt8Slot(0, min(code, 127), 0)  # deprecated_builtin_code
            b.PrependInt32Slot(2, 1, 0)  # version
            b.PrependInt32Slot(3, code, 0)  # builtin_code
            opcodes.append(b.EndObject())
        opcodes_offset = self._offsets(opcodes)
        buffers = self._offsets(self.buffers)
        description_offset = b.CreateString(description)
        b.StartObject(5)
        b.PrependUint32Slot(0, 3, 0)  # schema version
        b.PrependUOffsetTRelativeSlot(1, opcodes_offset, 0)
        b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
        b.PrependUOffsetTRelativeSlot(3, description_offset, 0)
        b.PrependUOffsetTRelativeSlot(4, buffers, 0)
        b.Finish(b.EndObject(), file_identifier=b"TFL3")
        return bytes(b.Output())


def build_mlp(
    *, in_features: int = 8, hidden: int = 16, out_features: int = 4, seed: int = 0
) -> bytes:
    """``input [batch, in] -> FC+RELU -> FC -> SOFTMAX -> probabilities [batch, out]``;
    the batch is 1 in ``shape`` and -1 in ``shape_signature``, so it can be resized."""
    w1, b1, w2, b2 = mlp_weights(in_features, hidden, out_features, seed)
    g = _Graph()

    def activation(name: str, features: int) -> int:
        return g.tensor(name, [1, features], signature=[-1, features])

    x = activation("input", in_features)
    h = activation("dense_1/Relu", hidden)
    logits = activation("dense_2/BiasAdd", out_features)
    probabilities = activation("probabilities", out_features)
    dense_1 = [x, g.constant("dense_1/kernel", w1), g.constant("dense_1/bias", b1)]
    g.op(FULLY_CONNECTED, dense_1, [h], FULLY_CONNECTED_OPTIONS, activation=RELU)
    dense_2 = [h, g.constant("dense_2/kernel", w2), g.constant("dense_2/bias", b2)]
    g.op(FULLY_CONNECTED, dense_2, [logits], FULLY_CONNECTED_OPTIONS)
    g.op(SOFTMAX, [logits], [probabilities], SOFTMAX_OPTIONS, beta=1.0)
    return g.finish([x], [probabilities], "edgefleet test MLP")


def build_two_inputs(*, features: int = 4, seed: int = 0) -> bytes:
    """``out = (a + b) * scale`` with inputs ``a`` and ``b`` of shape [1, features] and a
    constant [features] ``scale`` broadcast over the batch."""
    g = _Graph()
    a = g.tensor("a", [1, features])
    b = g.tensor("b", [1, features])
    total = g.tensor("sum", [1, features])
    out = g.tensor("out", [1, features])
    scale = g.constant("scale", two_inputs_scale(features, seed))
    g.op(ADD, [a, b], [total], ADD_OPTIONS)
    g.op(MUL, [total, scale], [out], MUL_OPTIONS)
    return g.finish([a, b], [out], "edgefleet test: (a + b) * scale")


def build_memory_bomb(elements: int = 10**9) -> bytes:
    """A few hundred bytes: ``a + b`` over [1, elements] float32, so allocating the
    tensors wants three 4 GB buffers."""
    g = _Graph()
    a, b, out = (g.tensor(name, [1, elements]) for name in ("a", "b", "out"))
    g.op(ADD, [a, b], [out], ADD_OPTIONS)
    return g.finish([a, b], [out], "edgefleet test: memory bomb")
