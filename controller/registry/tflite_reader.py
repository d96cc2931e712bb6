"""Inspect a TFLite model (a ``TFL3`` flatbuffer) without loading a runtime.

The registry reads every uploaded ``.tflite`` artifact with this module to record its
inputs, outputs, operators and size. It is pure Python on top of :mod:`struct` on
purpose: the controller must be able to inspect models on hosts where only
``tflite-runtime`` is installed, so it depends neither on the ``flatbuffers`` package
nor on LiteRT's generated schema module.

Every read is bounds-checked: a truncated or corrupted file raises
:class:`TfliteFormatError` naming what was being read, never ``IndexError``,
``struct.error`` or ``UnicodeDecodeError``.

Flatbuffer layout in brief (all little-endian): the file starts with a ``uint32`` offset
to the root table, followed by the 4-byte file identifier. A table starts with an
``int32`` *soffset*; ``table - soffset`` is its vtable: ``uint16`` vtable size,
``uint16`` table size, then one ``uint16`` per field (0 = absent, else the field's
offset from the table start). A field that refers to a table, vector or string holds a
``uint32`` offset relative to the field's own position. Vectors and strings start with
a ``uint32`` element count; strings are followed by a NUL byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["TfliteFormatError", "TfliteInfo", "TfliteTensorInfo", "is_tflite", "read_tflite"]

FILE_IDENTIFIER = b"TFL3"

# Field slots (declaration index in tflite's schema.fbs; the vtable entry is 4 + 2 * slot).
_MODEL_VERSION, _MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_DESCRIPTION = 0, 1, 2, 3
_MODEL_BUFFERS = 4
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS, _SUBGRAPH_OPERATORS = 0, 1, 2, 3
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME = 0, 1, 2, 3
_TENSOR_SHAPE_SIGNATURE, _TENSOR_EXTERNAL_BUFFER = 7, 10
_OPERATOR_OPCODE_INDEX = 0
_OPCODE_DEPRECATED_BUILTIN, _OPCODE_CUSTOM_CODE, _OPCODE_BUILTIN = 0, 1, 3
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2

_CUSTOM = 32  # BuiltinOperator.CUSTOM

# TensorType enum, by value, as numpy-style names.
_DTYPES: tuple[str, ...] = (
    "float32",
    "float16",
    "int32",
    "uint8",
    "int64",
    "string",
    "bool",
    "int16",
    "complex64",
    "int8",
    "float64",
    "complex128",
    "uint64",
    "resource",
    "variant",
    "uint32",
    "uint16",
    "int4",
    "bfloat16",
    "int2",
    "uint4",
    "float8_e4m3fn",
    "float8_e5m2",
)

# BuiltinOperator enum, by value (0..209), copied from LiteRT 2.3's schema_py_generated.
_BUILTIN_OPS: tuple[str, ...] = (
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEPTH_TO_SPACE",
    "DEQUANTIZE",
    "EMBEDDING_LOOKUP",
    "FLOOR",
    "FULLY_CONNECTED",
    "HASHTABLE_LOOKUP",
    "L2_NORMALIZATION",
    "L2_POOL_2D",
    "LOCAL_RESPONSE_NORMALIZATION",
    "LOGISTIC",
    "LSH_PROJECTION",
    "LSTM",
    "MAX_POOL_2D",
    "MUL",
    "RELU",
    "RELU_N1_TO_1",
    "RELU6",
    "RESHAPE",
    "RESIZE_BILINEAR",
    "RNN",
    "SOFTMAX",
    "SPACE_TO_DEPTH",
    "SVDF",
    "TANH",
    "CONCAT_EMBEDDINGS",
    "SKIP_GRAM",
    "CALL",
    "CUSTOM",
    "EMBEDDING_LOOKUP_SPARSE",
    "PAD",
    "UNIDIRECTIONAL_SEQUENCE_RNN",
    "GATHER",
    "BATCH_TO_SPACE_ND",
    "SPACE_TO_BATCH_ND",
    "TRANSPOSE",
    "MEAN",
    "SUB",
    "DIV",
    "SQUEEZE",
    "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "STRIDED_SLICE",
    "BIDIRECTIONAL_SEQUENCE_RNN",
    "EXP",
    "TOPK_V2",
    "SPLIT",
    "LOG_SOFTMAX",
    "DELEGATE",
    "BIDIRECTIONAL_SEQUENCE_LSTM",
    "CAST",
    "PRELU",
    "MAXIMUM",
    "ARG_MAX",
    "MINIMUM",
    "LESS",
    "NEG",
    "PADV2",
    "GREATER",
    "GREATER_EQUAL",
    "LESS_EQUAL",
    "SELECT",
    "SLICE",
    "SIN",
    "TRANSPOSE_CONV",
    "SPARSE_TO_DENSE",
    "TILE",
    "EXPAND_DIMS",
    "EQUAL",
    "NOT_EQUAL",
    "LOG",
    "SUM",
    "SQRT",
    "RSQRT",
    "SHAPE",
    "POW",
    "ARG_MIN",
    "FAKE_QUANT",
    "REDUCE_PROD",
    "REDUCE_MAX",
    "PACK",
    "LOGICAL_OR",
    "ONE_HOT",
    "LOGICAL_AND",
    "LOGICAL_NOT",
    "UNPACK",
    "REDUCE_MIN",
    "FLOOR_DIV",
    "REDUCE_ANY",
    "SQUARE",
    "ZEROS_LIKE",
    "FILL",
    "FLOOR_MOD",
    "RANGE",
    "RESIZE_NEAREST_NEIGHBOR",
    "LEAKY_RELU",
    "SQUARED_DIFFERENCE",
    "MIRROR_PAD",
    "ABS",
    "SPLIT_V",
    "UNIQUE",
    "CEIL",
    "REVERSE_V2",
    "ADD_N",
    "GATHER_ND",
    "COS",
    "WHERE",
    "RANK",
    "ELU",
    "REVERSE_SEQUENCE",
    "MATRIX_DIAG",
    "QUANTIZE",
    "MATRIX_SET_DIAG",
    "ROUND",
    "HARD_SWISH",
    "IF",
    "WHILE",
    "NON_MAX_SUPPRESSION_V4",
    "NON_MAX_SUPPRESSION_V5",
    "SCATTER_ND",
    "SELECT_V2",
    "DENSIFY",
    "SEGMENT_SUM",
    "BATCH_MATMUL",
    "PLACEHOLDER_FOR_GREATER_OP_CODES",
    "CUMSUM",
    "CALL_ONCE",
    "BROADCAST_TO",
    "RFFT2D",
    "CONV_3D",
    "IMAG",
    "REAL",
    "COMPLEX_ABS",
    "HASHTABLE",
    "HASHTABLE_FIND",
    "HASHTABLE_IMPORT",
    "HASHTABLE_SIZE",
    "REDUCE_ALL",
    "CONV_3D_TRANSPOSE",
    "VAR_HANDLE",
    "READ_VARIABLE",
    "ASSIGN_VARIABLE",
    "BROADCAST_ARGS",
    "RANDOM_STANDARD_NORMAL",
    "BUCKETIZE",
    "RANDOM_UNIFORM",
    "MULTINOMIAL",
    "GELU",
    "DYNAMIC_UPDATE_SLICE",
    "RELU_0_TO_1",
    "UNSORTED_SEGMENT_PROD",
    "UNSORTED_SEGMENT_MAX",
    "UNSORTED_SEGMENT_SUM",
    "ATAN2",
    "UNSORTED_SEGMENT_MIN",
    "SIGN",
    "BITCAST",
    "BITWISE_XOR",
    "RIGHT_SHIFT",
    "STABLEHLO_LOGISTIC",
    "STABLEHLO_ADD",
    "STABLEHLO_DIVIDE",
    "STABLEHLO_MULTIPLY",
    "STABLEHLO_MAXIMUM",
    "STABLEHLO_RESHAPE",
    "STABLEHLO_CLAMP",
    "STABLEHLO_CONCATENATE",
    "STABLEHLO_BROADCAST_IN_DIM",
    "STABLEHLO_CONVOLUTION",
    "STABLEHLO_SLICE",
    "STABLEHLO_CUSTOM_CALL",
    "STABLEHLO_REDUCE",
    "STABLEHLO_ABS",
    "STABLEHLO_AND",
    "STABLEHLO_COSINE",
    "STABLEHLO_EXPONENTIAL",
    "STABLEHLO_FLOOR",
    "STABLEHLO_LOG",
    "STABLEHLO_MINIMUM",
    "STABLEHLO_NEGATE",
    "STABLEHLO_OR",
    "STABLEHLO_POWER",
    "STABLEHLO_REMAINDER",
    "STABLEHLO_RSQRT",
    "STABLEHLO_SELECT",
    "STABLEHLO_SUBTRACT",
    "STABLEHLO_TANH",
    "STABLEHLO_SCATTER",
    "STABLEHLO_COMPARE",
    "STABLEHLO_CONVERT",
    "STABLEHLO_DYNAMIC_SLICE",
    "STABLEHLO_DYNAMIC_UPDATE_SLICE",
    "STABLEHLO_PAD",
    "STABLEHLO_IOTA",
    "STABLEHLO_DOT_GENERAL",
    "STABLEHLO_REDUCE_WINDOW",
    "STABLEHLO_SORT",
    "STABLEHLO_WHILE",
    "STABLEHLO_GATHER",
    "STABLEHLO_TRANSPOSE",
    "DILATE",
    "STABLEHLO_RNG_BIT_GENERATOR",
    "REDUCE_WINDOW",
    "STABLEHLO_COMPOSITE",
    "STABLEHLO_SHIFT_LEFT",
    "STABLEHLO_CBRT",
    "STABLEHLO_CASE",
)

_STRUCTS = {fmt: struct.Struct(fmt) for fmt in ("<b", "<H", "<i", "<I", "<Q")}


class TfliteFormatError(ValueError):
    """The bytes are not a well-formed TFLite model; the message says what is wrong."""


@dataclass(frozen=True)
class TfliteTensorInfo:
    name: str
    dtype: str
    shape: list[int | None]  # None marks a dynamic dimension


@dataclass(frozen=True)
class TfliteInfo:
    schema_version: int
    inputs: list[TfliteTensorInfo]
    outputs: list[TfliteTensorInfo]
    parameter_count: int  # elements of the constant tensors of the main subgraph
    operator_count: int  # operators in all subgraphs
    subgraph_count: int
    description: str | None
    operators: list[str]  # sorted distinct op names used by any subgraph


def is_tflite(data: bytes) -> bool:
    """Whether ``data`` carries the TFLite file identifier (it may still be malformed)."""
    return len(data) >= 8 and data[4:8] == FILE_IDENTIFIER


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def need(self, pos: int, length: int, what: str) -> None:
        if pos < 0:
            raise TfliteFormatError(
                f"offset {pos:#x} of {what} points before the start of the file"
            )
        if pos + length > self.size:
            raise TfliteFormatError(
                f"offset {pos:#x} of {what} points past the end of the "
                f"{self.size}-byte file (truncated?)"
            )

    def scalar(self, fmt: str, pos: int, what: str) -> int:
        st = _STRUCTS[fmt]
        self.need(pos, st.size, what)
        return int(st.unpack_from(self.data, pos)[0])

    def deref(self, pos: int, what: str) -> int:
        """Follow the ``uint32`` offset stored at ``pos``."""
        return pos + self.scalar("<I", pos, what)

    def vector(self, pos: int, elem_size: int, what: str) -> tuple[int, int]:
        """(start of the elements, element count) of the vector at ``pos``."""
        count = self.scalar("<I", pos, f"length of {what}")
        start = pos + 4
        if count * elem_size > self.size - start:
            raise TfliteFormatError(
                f"{what} at offset {pos:#x} claims {count} elements, which run past the end "
                f"of the {self.size}-byte file (truncated?)"
            )
        return start, count

    def string(self, pos: int, what: str) -> str:
        start, length = self.vector(pos, 1, what)
        if self.scalar("<b", start + length, f"NUL terminator of {what}") != 0:
            raise TfliteFormatError(f"{what} at offset {pos:#x} is not NUL-terminated")
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TfliteFormatError(f"{what} at offset {pos:#x} is not valid UTF-8") from exc


class _Table:
    """One flatbuffer table, its vtable and inline size checked against the file."""

    def __init__(self, reader: _Reader, pos: int, what: str) -> None:
        self.r, self.pos, self.what = reader, pos, what
        self.vtable = pos - reader.scalar("<i", pos, what)
        vt_what = f"vtable of {what}"
        self.vtable_size = reader.scalar("<H", self.vtable, vt_what)
        self.table_size = reader.scalar("<H", self.vtable + 2, vt_what)
        if self.vtable_size < 4 or self.vtable_size % 2 or self.table_size < 4:
            raise TfliteFormatError(
                f"{vt_what} at offset {self.vtable:#x} is malformed (vtable size "
                f"{self.vtable_size}, table size {self.table_size})"
            )
        reader.need(self.vtable, self.vtable_size, vt_what)
        reader.need(pos, self.table_size, what)

    def _field(self, slot: int, width: int, name: str) -> int | None:
        entry = 4 + 2 * slot
        if entry + 2 > self.vtable_size:
            return None  # written by an older schema: the field is absent
        offset = self.r.scalar("<H", self.vtable + entry, f"vtable of {self.what}")
        if offset == 0:
            return None
        if offset + width > self.table_size:
            raise TfliteFormatError(
                f"field {name} of {self.what} (offset {self.pos:#x}) lies outside its "
                f"{self.table_size}-byte table"
            )
        return self.pos + offset

    def scalar(self, slot: int, fmt: str, name: str) -> int:
        pos = self._field(slot, _STRUCTS[fmt].size, name)
        return 0 if pos is None else self.r.scalar(fmt, pos, f"{name} of {self.what}")

    def ref(self, slot: int, name: str) -> int | None:
        pos = self._field(slot, 4, name)
        return None if pos is None else self.r.deref(pos, f"{name} of {self.what}")

    def string(self, slot: int, name: str) -> str | None:
        pos = self.ref(slot, name)
        return None if pos is None else self.r.string(pos, f"{name} of {self.what}")

    def ints(self, slot: int, name: str) -> list[int] | None:
        """An ``[int]`` (int32) vector field, None when absent."""
        pos = self.ref(slot, name)
        if pos is None:
            return None
        start, count = self.r.vector(pos, 4, f"{name} of {self.what}")
        return [v for (v,) in struct.iter_unpack("<i", self.r.data[start : start + 4 * count])]

    def tables(self, slot: int, name: str, item: str) -> list[_Table]:
        """A vector-of-tables field; element ``i`` is described as ``f"{item} {i}"``."""
        pos = self.ref(slot, name)
        if pos is None:
            return []
        start, count = self.r.vector(pos, 4, f"{name} of {self.what}")
        return [
            _Table(self.r, self.r.deref(start + 4 * i, f"{item} {i}"), f"{item} {i}")
            for i in range(count)
        ]


def _operator_name(code: _Table) -> str:
    builtin = max(
        code.scalar(_OPCODE_DEPRECATED_BUILTIN, "<b", "deprecated_builtin_code"),
        code.scalar(_OPCODE_BUILTIN, "<i", "builtin_code"),
    )
    if builtin == _CUSTOM:
        return f"CUSTOM:{code.string(_OPCODE_CUSTOM_CODE, 'custom_code') or ''}"
    if builtin < 0:
        raise TfliteFormatError(f"{code.what} has a negative builtin code {builtin}")
    return _BUILTIN_OPS[builtin] if builtin < len(_BUILTIN_OPS) else f"BUILTIN_{builtin}"


def _buffer_has_data(buffer: _Table, size: int) -> bool:
    data = buffer.ref(_BUFFER_DATA, "data")
    if data is not None and buffer.r.vector(data, 1, f"data of {buffer.what}")[1] > 0:
        return True
    offset = buffer.scalar(_BUFFER_OFFSET, "<Q", "offset")
    length = buffer.scalar(_BUFFER_SIZE, "<Q", "size")
    if offset <= 1:  # 0 = unset, 1 = placeholder written by the converter
        return False
    if offset + length > size:
        raise TfliteFormatError(
            f"offset {offset:#x} of the {length} data bytes of {buffer.what} points past "
            f"the end of the {size}-byte file (truncated?)"
        )
    return length > 0


def _dims(values: list[int], what: str) -> list[int | None]:
    for v in values:
        if v < -1:
            raise TfliteFormatError(f"{what} has an invalid dimension {v}")
    return [None if v == -1 else v for v in values]


def _read_tensor(tensor: _Table, has_data: list[bool]) -> tuple[TfliteTensorInfo, int]:
    """The tensor's description and its element count if it is constant (else 0)."""
    dtype_code = tensor.scalar(_TENSOR_TYPE, "<b", "type")
    dtype = _DTYPES[dtype_code] if 0 <= dtype_code < len(_DTYPES) else f"type_{dtype_code}"
    shape = _dims(tensor.ints(_TENSOR_SHAPE, "shape") or [], f"shape of {tensor.what}")
    signature = tensor.ints(_TENSOR_SHAPE_SIGNATURE, "shape_signature")
    info = TfliteTensorInfo(
        name=tensor.string(_TENSOR_NAME, "name") or "",
        dtype=dtype,
        # An empty signature is what converters write when it says nothing beyond shape.
        shape=_dims(signature, f"shape_signature of {tensor.what}") if signature else shape,
    )
    buffer = tensor.scalar(_TENSOR_BUFFER, "<I", "buffer")
    if buffer >= len(has_data) and (buffer or has_data):
        raise TfliteFormatError(
            f"{tensor.what} refers to buffer {buffer}, but the model has {len(has_data)} buffers"
        )
    external = tensor.scalar(_TENSOR_EXTERNAL_BUFFER, "<I", "external_buffer")
    if not (external or (has_data and has_data[buffer])):
        return info, 0
    count = 1
    for dim in shape:
        if dim is None:
            raise TfliteFormatError(f"constant {tensor.what} has a dynamic dimension")
        count *= dim
    return info, count


def _io(
    graph: _Table, slot: int, name: str, tensors: list[TfliteTensorInfo]
) -> list[TfliteTensorInfo]:
    picked = []
    for i, index in enumerate(graph.ints(slot, name) or []):
        if not 0 <= index < len(tensors):
            raise TfliteFormatError(
                f"{name} {i} of {graph.what} refers to tensor {index}, but it has "
                f"{len(tensors)} tensors"
            )
        picked.append(tensors[index])
    return picked


def read_tflite(data: bytes) -> TfliteInfo:
    """Describe a TFLite model; raise :class:`TfliteFormatError` if it is malformed."""
    if len(data) < 8:
        raise TfliteFormatError(f"a {len(data)}-byte file is too short to be a TFLite model")
    if not is_tflite(data):
        raise TfliteFormatError(
            f"file identifier is {bytes(data[4:8])!r}, not {FILE_IDENTIFIER!r}: not a TFLite model"
        )
    r = _Reader(data)
    model = _Table(r, r.deref(0, "root table offset"), "model")
    version = model.scalar(_MODEL_VERSION, "<I", "version")
    description = model.string(_MODEL_DESCRIPTION, "description")
    op_names = [
        _operator_name(code)
        for code in model.tables(_MODEL_OPERATOR_CODES, "operator_codes", "operator code")
    ]
    has_data = [
        _buffer_has_data(buffer, r.size)
        for buffer in model.tables(_MODEL_BUFFERS, "buffers", "buffer")
    ]
    subgraphs = model.tables(_MODEL_SUBGRAPHS, "subgraphs", "subgraph")
    if not subgraphs:
        raise TfliteFormatError("the model has no subgraphs")

    used_ops: set[str] = set()
    operator_count = parameter_count = 0
    inputs: list[TfliteTensorInfo] = []
    outputs: list[TfliteTensorInfo] = []
    for g, graph in enumerate(subgraphs):
        tensors: list[TfliteTensorInfo] = []
        for tensor in graph.tables(_SUBGRAPH_TENSORS, "tensors", f"subgraph {g} tensor"):
            info, constant_elements = _read_tensor(tensor, has_data)
            tensors.append(info)
            if g == 0:
                parameter_count += constant_elements
        if g == 0:
            inputs = _io(graph, _SUBGRAPH_INPUTS, "inputs", tensors)
            outputs = _io(graph, _SUBGRAPH_OUTPUTS, "outputs", tensors)
        for op in graph.tables(_SUBGRAPH_OPERATORS, "operators", f"subgraph {g} operator"):
            index = op.scalar(_OPERATOR_OPCODE_INDEX, "<I", "opcode_index")
            if index >= len(op_names):
                raise TfliteFormatError(
                    f"{op.what} uses operator code {index}, but the model has {len(op_names)}"
                )
            used_ops.add(op_names[index])
            operator_count += 1

    return TfliteInfo(
        schema_version=version,
        inputs=inputs,
        outputs=outputs,
        parameter_count=parameter_count,
        operator_count=operator_count,
        subgraph_count=len(subgraphs),
        description=description,
        operators=sorted(used_ops),
    )
