"""Request and response tensors, validated against the model's signature before the
runtime sees them. Four body forms (``Content-Type``):

``application/json``
    ``{"inputs": {name: nested lists}}``; answered ``{"model", "version", "outputs"}``.
``application/x-npz``
    a numpy ``.npz`` archive of named arrays (``np.savez``); answered with one.
``application/x-npy``
    one tensor as a ``.npy`` file (``np.save``); answered with the output as ``.npy``.
``application/octet-stream``
    one tensor as raw bytes, C order, little-endian, described by the headers
    ``X-Tensor-Dtype`` (``float32``, ``uint8``, ... one of :data:`RAW_DTYPES`) and
    ``X-Tensor-Shape`` (``1,3,224,224``; empty for a scalar). Answered the same way: the
    output's bytes, with ``X-Tensor-Name``, ``X-Tensor-Dtype`` and ``X-Tensor-Shape``.
    The cheapest form: decoding is one ``np.frombuffer`` on the body (zero-copy).

The two single-tensor forms (``.npy``, raw) name their input with ``X-Tensor-Name``,
which may be left out when the model has one input; they are answered in kind when the
model has one output, else with an ``.npz`` of every output. ``Accept`` may ask for any
of the four forms instead of the request's own.

Every rejection is a :class:`RequestError` naming the input and what the model expects,
so a client can fix its request without reading the model."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from node_agent.runtimes import Dim, TensorSpec, shared_dim
from node_agent.server import npz
from node_agent.server.npz import Body

JSON_TYPE = "application/json"
NPZ_TYPE = "application/x-npz"
NPY_TYPE = "application/x-npy"
RAW_TYPE = "application/octet-stream"
MEDIA_TYPES = (JSON_TYPE, NPZ_TYPE, NPY_TYPE, RAW_TYPE)
SINGLE_TENSOR_TYPES = frozenset({NPY_TYPE, RAW_TYPE})

# Request / response headers of the single-tensor forms (the request's, lower-case).
NAME_HEADER = "x-tensor-name"
DTYPE_HEADER = "x-tensor-dtype"
SHAPE_HEADER = "x-tensor-shape"

# The dtypes a raw body may declare: numbers and booleans, little-endian.
RAW_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
_MAX_RANK = 32
_LITTLE_ENDIAN = sys.byteorder == "little"
_RAW_NAMES = {dtype.str: name for name, dtype in RAW_DTYPES.items()}  # "<f4": "float32"


class RequestError(Exception):
    """A client error: ``status`` is the HTTP status, ``code`` a machine-readable code."""

    def __init__(self, status: int, code: str, message: str, *, input: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.input = input

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.message}
        if self.input is not None:
            body["input"] = self.input
        return body


def format_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def describe(spec: TensorSpec) -> str:
    return f"{spec.name!r} ({spec.dtype} {format_shape(spec.shape)})"


def _invalid(spec: TensorSpec, message: str, code: str = "invalid_input") -> RequestError:
    return RequestError(
        422,
        code,
        f"input {spec.name!r}: {message}; expected dtype {spec.dtype}, "
        f"shape {format_shape(spec.shape)}",
        input=spec.name,
    )


# ---------------------------------------------------------------------- decoding
def decode_json(body: bytes, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), dict):
        raise RequestError(
            400, "invalid_body", 'expected a JSON object {"inputs": {"<name>": [...]}}'
        )
    inputs: dict[str, Any] = document["inputs"]
    by_name = {s.name: s for s in specs}
    _check_names(inputs, specs)
    return {name: _from_json(value, by_name[name]) for name, value in inputs.items()}


def _from_json(value: Any, spec: TensorSpec) -> np.ndarray:
    if spec.dtype == "str":
        raise _invalid(spec, "string inputs are not supported", "unsupported_dtype")
    target = np.dtype(spec.dtype)
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise _invalid(spec, f"not a rectangular nested list ({exc})") from exc
    kind = array.dtype.kind
    if kind not in "biuf":
        raise _invalid(spec, "values must be numbers (nested lists of numbers only)")
    if target.kind == "b":
        if kind == "b":
            return array
        if kind in "iu" and np.isin(array, (0, 1)).all():
            return array.astype(target)
        raise _invalid(spec, "values must be booleans (or 0/1)")
    if kind == "b":
        raise _invalid(spec, "booleans given where numbers are expected")
    if target.kind in "iu":
        if kind == "f" and (not np.isfinite(array).all() or (array != np.trunc(array)).any()):
            raise _invalid(spec, "values must be integers")
        if array.size:
            info = np.iinfo(target)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise _invalid(spec, f"values out of range for {target.name}")
    return array.astype(target, copy=False)


def decode_npz(
    body: Body, specs: Sequence[TensorSpec], *, max_members: int, max_bytes: int
) -> dict[str, np.ndarray]:
    """A ``.npz`` archive of named arrays, loaded without pickle: the zero-copy fast path
    for what ``np.savez`` writes, else ``np.load``, where the archive's declared
    uncompressed size is checked before anything is decompressed."""
    try:
        fast = npz.read(body, max_members=max_members)
    except ValueError as exc:
        raise RequestError(400, "invalid_npz", f"broken npz archive: {exc}") from exc
    if fast is not None:
        _check_names(fast, specs)
        return fast
    try:
        loaded = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise RequestError(
            400, "invalid_npz", f"the body is not a numpy .npz archive: {exc}"
        ) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise RequestError(
            400, "invalid_npz", "the body is a single .npy array, expected a .npz archive"
        )
    with loaded:
        assert loaded.zip is not None
        infos = loaded.zip.infolist()
        if len(infos) > max_members:
            raise RequestError(400, "invalid_npz", f"more than {max_members} arrays in the npz")
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise RequestError(
                413,
                "payload_too_large",
                f"the npz expands to {declared} bytes, over the {max_bytes}-byte limit",
            )
        names = list(loaded.files)
        _check_names(dict.fromkeys(names), specs)
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            try:
                value = loaded[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise RequestError(
                    422, "invalid_input", f"input {name!r}: {exc}", input=name
                ) from exc
            if not isinstance(value, np.ndarray):
                raise RequestError(
                    400, "invalid_npz", f"member {name!r} is not a .npy array", input=name
                )
            arrays[name] = value
    return arrays


def decode_tensor(
    body: Body,
    request_type: str,
    specs: Sequence[TensorSpec],
    *,
    name: str | None,
    dtype: str | None = None,
    shape: str | None = None,
) -> dict[str, np.ndarray]:
    """One tensor, as ``.npy`` (``request_type`` :data:`NPY_TYPE`) or raw bytes with
    ``dtype`` and ``shape`` from the headers (:data:`RAW_TYPE`), zero-copy. ``name`` is
    ``X-Tensor-Name``, needed only when the model has several inputs."""
    input_name = _single_input(name, specs)
    if request_type == NPY_TYPE:
        return {input_name: _from_npy(body, input_name)}
    return {input_name: _from_raw(body, input_name, dtype, shape)}


def _single_input(name: str | None, specs: Sequence[TensorSpec]) -> str:
    if name is None:
        if len(specs) == 1:
            return specs[0].name
        signature = ", ".join(describe(s) for s in specs)
        raise RequestError(
            422,
            "missing_input",
            f"the model has {len(specs)} inputs ({signature}): name the tensor with "
            f"X-Tensor-Name, or send them all in one {NPZ_TYPE} archive",
        )
    with contextlib.suppress(UnicodeError):  # header values arrive as latin-1: a UTF-8
        name = name.encode("latin-1").decode("utf-8")  # name is decoded back
    _check_names({name: None}, specs, partial=True)
    return name


def _bad_tensor(name: str, message: str) -> RequestError:
    return RequestError(400, "invalid_tensor", f"input {name!r}: {message}", input=name)


def _from_npy(body: Body, name: str) -> np.ndarray:
    """``npz.read_npy`` (zero-copy), else numpy's own header reader, never ``np.load``:
    the data must be exactly what the header declares before anything is allocated."""
    try:
        array = npz.read_npy(body)
    except ValueError as exc:
        raise _bad_tensor(name, f"broken .npy body: {exc}") from exc
    if array is not None:
        return array
    fp = io.BytesIO(body)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")
    except (ValueError, EOFError, SyntaxError) as exc:
        raise _bad_tensor(name, f"the body is not a numpy .npy array: {exc}") from exc
    if dtype.hasobject:
        raise _bad_tensor(name, f"dtype {dtype} holds Python objects: refused (allow_pickle)")
    offset = fp.tell()
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(body) - offset:
        raise _bad_tensor(
            name,
            f"npy data is {len(body) - offset} bytes, shape {format_shape(shape)} of "
            f"{dtype} needs {count * dtype.itemsize}",
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape, order="F" if fortran else "C")
    return array if array.flags.aligned else array.copy()


def _from_raw(body: Body, name: str, dtype_name: str | None, shape_text: str | None) -> np.ndarray:
    if dtype_name is None or shape_text is None:
        missing = "X-Tensor-Dtype" if dtype_name is None else "X-Tensor-Shape"
        raise RequestError(
            400,
            "missing_header",
            f"input {name!r}: a {RAW_TYPE} body needs the X-Tensor-Dtype and X-Tensor-Shape "
            f"headers, {missing} is missing",
            input=name,
        )
    dtype = RAW_DTYPES.get(dtype_name.strip().lower())
    if dtype is None:
        raise _bad_tensor(
            name,
            f"X-Tensor-Dtype {dtype_name[:40]!r} is not one of {', '.join(RAW_DTYPES)}",
        )
    shape = parse_shape(shape_text)
    if shape is None:
        raise _bad_tensor(
            name,
            f"X-Tensor-Shape {shape_text[:100]!r} is not a list of sizes such as 1,3,224,224",
        )
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(body):
        raise _bad_tensor(
            name,
            f"the body is {len(body)} bytes, shape {format_shape(shape)} of {dtype.name} "
            f"needs {count * dtype.itemsize}",
        )
    array = np.frombuffer(body, dtype=dtype).reshape(shape)
    if not array.flags.aligned:
        array = array.copy()
    if not dtype.isnative:  # a big-endian host
        array = array.astype(dtype.newbyteorder("="))
    return array


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """What the answer to a plan's request was last time: one output of this dtype and
    shape, behind this whole head. An answer like it reuses the head."""

    output: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    nbytes: int
    head: bytes

    def matches(self, outputs: Mapping[str, np.ndarray]) -> memoryview | None:
        """The one output's bytes, if it is exactly like this one's, else ``None``."""
        array = outputs.get(self.output)
        if (
            array is None
            or len(outputs) != 1
            or array.dtype != self.dtype
            or array.shape != self.shape
        ):
            return None
        data = array.data
        return data if data.c_contiguous else None


@dataclass(slots=True)
class RawPlan:
    """What a raw-tensor request's headers decoded to and passed validation as: a later
    request with the same headers and length is one :func:`raw_feeds` away from the
    runtime, and when its answer matches the last one's, one ``sendmsg`` from the client.
    Plans are kept per model version (validation depends on its signature)."""

    input: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    nbytes: int
    answer: str
    last: RawAnswer | None = None
    bindable: bool = True  # False once binding it failed (see model.ActiveModel.bound)

    @classmethod
    def of(
        cls, arrays: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray], answer: str
    ) -> RawPlan | None:
        """The plan of a request that :func:`decode_tensor` and :func:`validate` took
        as it came (no byte swap, no copy), else ``None``."""
        ((name, array),) = arrays.items()
        if feeds.get(name) is not array or len(feeds) != 1 or not _LITTLE_ENDIAN:
            return None  # (a big-endian host swaps every raw body: no plan)
        return cls(name, array.dtype, array.shape, array.nbytes, answer)

    def remember(
        self, outputs: Mapping[str, np.ndarray], head: bytes, payload: bytes | memoryview
    ) -> None:
        """Keep a raw answer's head, when its payload (from :func:`encode_raw`) is the
        output's own memory: an answer like it can then be sent as it is."""
        ((name, array),) = outputs.items()
        exporter: object = payload.obj if isinstance(payload, memoryview) else None
        if exporter is array:
            self.last = RawAnswer(name, array.dtype, array.shape, array.nbytes, head)


def raw_feeds(body: Body, plan: RawPlan) -> dict[str, np.ndarray]:
    """The feeds of a raw body of ``plan.nbytes`` bytes, zero-copy when aligned."""
    array = np.ndarray(plan.shape, plan.dtype, body)
    return {plan.input: array if array.flags.aligned else array.copy()}


def parse_shape(text: str) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` (spaces, a trailing comma and one pair of brackets allowed) ->
    sizes; ``""`` -> ``()``; ``None`` if it is not that."""
    text = text.strip()
    if text[:1] in ("[", "(") and text[-1:] == ("]" if text[0] == "[" else ")"):
        text = text[1:-1].strip()
    if not text:
        return ()
    parts = text.split(",")
    if len(parts) > 1 and not parts[-1].strip():
        parts.pop()  # "3," as in a Python 1-tuple
    if len(parts) > _MAX_RANK:
        return None
    shape = []
    for part in parts:
        part = part.strip()
        if not (part.isdigit() and part.isascii() and len(part) <= 12):
            return None
        shape.append(int(part))
    return tuple(shape)


def _check_names(
    given: Mapping[str, Any], specs: Sequence[TensorSpec], *, partial: bool = False
) -> None:
    """Every name in ``given`` is an input of the model, and (unless ``partial``) every
    input is in ``given``."""
    if len(given) == len(specs) and all(s.name in given for s in specs):
        return  # the common case, without building any message
    expected = [s.name for s in specs]
    signature = ", ".join(describe(s) for s in specs)
    for name in given:
        if name not in expected:
            raise RequestError(
                422,
                "unknown_input",
                f"unknown input {name!r}; the model's inputs are {signature}",
                input=name,
            )
    for spec in specs:
        if spec.name not in given and not partial:
            raise RequestError(
                422,
                "missing_input",
                f"missing input {describe(spec)}; the model's inputs are {signature}",
                input=spec.name,
            )


# ---------------------------------------------------------------------- validation
def validate(
    arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]
) -> dict[str, np.ndarray]:
    """The feeds for the runtime: every input present, of the model's dtype and rank,
    fixed dims equal, a named dynamic dim the same size wherever it appears (in every
    input that has it). Unnamed dynamic dims (``?``, see ``shared_dim``) are each free:
    an input ``[?, 3, ?, ?]`` takes a 48x192 image."""
    _check_names(arrays, specs)
    named: dict[str, tuple[int, str]] = {}
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        array = arrays[spec.name]
        if spec.dtype == "str":
            raise _invalid(spec, "string inputs are not supported", "unsupported_dtype")
        want = _dtype(spec.dtype)
        if array.dtype != want:
            if array.dtype.newbyteorder("=") != want:
                raise _invalid(spec, f"got dtype {array.dtype.name}", "wrong_dtype")
            array = array.astype(want)  # the same type in the other byte order
        if array.ndim != len(spec.shape):
            raise _invalid(
                spec,
                f"got shape {format_shape(array.shape)} (rank {array.ndim}, "
                f"expected {len(spec.shape)})",
                "wrong_shape",
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if dim is None:
                continue
            if isinstance(dim, int):
                if dim >= 0 and size != dim:
                    raise _invalid(
                        spec,
                        f"got shape {format_shape(array.shape)}: dim {axis} must be {dim}",
                        "wrong_shape",
                    )
                continue
            if shared_dim(dim) is None:
                continue  # "?": any size, whatever the other dims are
            seen = named.setdefault(dim, (size, spec.name))
            if seen[0] != size:
                raise _invalid(
                    spec,
                    f"got shape {format_shape(array.shape)}: dim {axis} ({dim!r}) is {size} "
                    f"but {dim!r} is {seen[0]} in input {seen[1]!r}",
                    "wrong_shape",
                )
        # (ascontiguousarray would turn a 0-d scalar input into 1-d)
        feeds[spec.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    return feeds


_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(name: str) -> np.dtype[Any]:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = _DTYPES[name] = np.dtype(name)
    return dtype


# ---------------------------------------------------------------------- encoding
def encode_json(outputs: Mapping[str, np.ndarray], **extra: Any) -> bytes:
    document = {**extra, "outputs": {name: value.tolist() for name, value in outputs.items()}}
    return json.dumps(document, separators=(",", ":")).encode()


def encode_npz(outputs: Mapping[str, np.ndarray]) -> bytes:
    return npz.write(outputs)


def encode_npy(array: np.ndarray) -> bytes:
    return npz.write_npy(array)


def encode_raw(name: str, array: np.ndarray) -> tuple[memoryview, dict[str, str]]:
    """The output's bytes (C order, little-endian; no copy when the runtime's array is
    already that) and the ``X-Tensor-*`` headers that describe them."""
    dtype_name = _RAW_NAMES.get(array.dtype.str)
    if dtype_name is None:  # big-endian, or not a number
        if array.dtype.kind in "biuf":
            array = array.astype(array.dtype.newbyteorder("<"))
            dtype_name = _RAW_NAMES.get(array.dtype.str)
        if dtype_name is None:
            raise ValueError(f"output {name!r} has dtype {array.dtype}: not representable as raw")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    data = array.data.cast("B") if array.size else memoryview(b"")
    headers = {
        "X-Tensor-Name": name.encode().decode("latin-1"),
        "X-Tensor-Dtype": dtype_name,
        "X-Tensor-Shape": ",".join(map(str, array.shape)),
    }
    return data, headers


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def response_type(accept: str | None, request_type: str, outputs: int = 1) -> str:
    """The response form: the first of :data:`MEDIA_TYPES` that ``Accept`` names (a
    wildcard: the request's own form), else the request's own form. A single-tensor form
    needs a model with one output: several are answered with an npz."""
    chosen = request_type
    if accept:
        for part in accept.split(","):
            value = media_type(part)
            if value in MEDIA_TYPES:
                chosen = value
                break
            if value in ("application/*", "*/*"):
                break
    if chosen in SINGLE_TENSOR_TYPES and outputs != 1:
        return NPZ_TYPE
    return chosen


def wants_npz(accept: str | None, request_type: str) -> bool:
    """Whether the response is an npz (see :func:`response_type`)."""
    return response_type(accept, request_type) == NPZ_TYPE
