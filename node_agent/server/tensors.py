"""Request and response tensors: JSON (``{"inputs": {name: nested lists}}``) and numpy
``.npz`` archives, validated against the model's signature before the runtime sees them.

Every rejection is a :class:`RequestError` naming the input and what the model expects,
so a client can fix its request without reading the model."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from node_agent.runtimes import Dim, TensorSpec
from node_agent.server import npz

JSON_TYPE = "application/json"
NPZ_TYPE = "application/x-npz"


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
    body: bytes, specs: Sequence[TensorSpec], *, max_members: int, max_bytes: int
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


def _check_names(given: Mapping[str, Any], specs: Sequence[TensorSpec]) -> None:
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
        if spec.name not in given:
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
    fixed dims equal, a named dynamic dim the same size in every input that has it."""
    _check_names(arrays, specs)
    named: dict[str, tuple[int, str]] = {}
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        array = arrays[spec.name]
        if spec.dtype == "str":
            raise _invalid(spec, "string inputs are not supported", "unsupported_dtype")
        if array.dtype != np.dtype(spec.dtype):
            raise _invalid(spec, f"got dtype {array.dtype.name}", "wrong_dtype")
        got = format_shape(list(array.shape))
        if array.ndim != len(spec.shape):
            raise _invalid(
                spec,
                f"got shape {got} (rank {array.ndim}, expected {len(spec.shape)})",
                "wrong_shape",
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(dim, int) and dim >= 0 and size != dim:
                raise _invalid(spec, f"got shape {got}: dim {axis} must be {dim}", "wrong_shape")
            if isinstance(dim, str):
                seen = named.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise _invalid(
                        spec,
                        f"got shape {got}: dim {axis} ({dim!r}) is {size} but {dim!r} is "
                        f"{seen[0]} in input {seen[1]!r}",
                        "wrong_shape",
                    )
        # (ascontiguousarray would turn a 0-d scalar input into 1-d)
        feeds[spec.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    return feeds


# ---------------------------------------------------------------------- encoding
def encode_json(outputs: Mapping[str, np.ndarray], **extra: Any) -> bytes:
    document = {**extra, "outputs": {name: value.tolist() for name, value in outputs.items()}}
    return json.dumps(document, separators=(",", ":")).encode()


def encode_npz(outputs: Mapping[str, np.ndarray]) -> bytes:
    return npz.write(outputs)


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def wants_npz(accept: str | None, request_type: str) -> bool:
    """The response form: what ``Accept`` names, else the request's own form."""
    accepted = [media_type(part) for part in (accept or "").split(",") if part.strip()]
    for value in accepted:
        if value == NPZ_TYPE:
            return True
        if value in (JSON_TYPE, "application/*", "*/*"):
            return request_type == NPZ_TYPE if value != JSON_TYPE else False
    return request_type == NPZ_TYPE
