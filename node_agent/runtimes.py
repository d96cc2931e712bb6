"""Model runtimes behind one small interface: onnxruntime for ONNX, the LiteRT / TFLite
interpreter for TFLite. Used by the inference server, the on-node benchmark and the
controller's validation probe, so a model is loaded the same way everywhere.

TFLite import order: ``ai_edge_litert`` (LiteRT, maintained, numpy 2) first, then
``tflite_runtime`` (last release 2.14, numpy<2 only: under numpy 2 it fails to load any
model with ``_ARRAY_API not found``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Dim = int | str | None

UNNAMED_DIMS = frozenset({"", "?", "None", "-1"})
"""``dim_param`` values that exporters write for "any size" (tf2onnx and paddle2onnx
write ``?``): each such dim is its own, tied to no other dim, as an unset one is."""


def shared_dim(dim: Dim) -> str | None:
    """The name that ties ``dim`` to every other dim of that name, in this input and in
    the model's other inputs (``batch``, ``height``), or ``None``: a fixed size, or an
    unnamed dynamic dim (unset, a negative size, or one of :data:`UNNAMED_DIMS`), whose
    size is independent of every other dim's. (A ``dim_value`` of 0 is a fixed size:
    onnxruntime refuses anything else for it.)"""
    if isinstance(dim, str) and dim.strip() not in UNNAMED_DIMS:
        return dim
    return None


def fixed_dim(dim: Dim) -> int | None:
    """The size a dim fixes, or ``None`` where it is dynamic (named or not)."""
    return dim if isinstance(dim, int) and dim >= 0 else None


class RuntimeUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    # int for fixed dims, str for named dynamic dims (see shared_dim: "?" names nothing),
    # None if unnamed
    shape: tuple[Dim, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class Runner(Protocol):
    @property
    def runtime(self) -> str: ...  # "onnxruntime 1.20.1", "ai_edge_litert 2.3.0"
    @property
    def inputs(self) -> Sequence[TensorSpec]: ...
    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


_TFLITE_MODULES = ("ai_edge_litert", "tflite_runtime")


def load_tflite_interpreter() -> tuple[type[Any], str]:
    """The TFLite ``Interpreter`` class and a label naming the package it came from."""
    errors = []
    for package in _TFLITE_MODULES:
        try:
            module = importlib.import_module(f"{package}.interpreter")
        except ImportError as exc:
            errors.append(f"{package}: {exc}")
            continue
        top = importlib.import_module(package)
        version = getattr(top, "__version__", None) or _dist_version(package)
        return module.Interpreter, f"{package} {version}"
    raise RuntimeUnavailable(
        "no TFLite interpreter: install ai-edge-litert (numpy 2) or tflite-runtime "
        f"(numpy<2) [{'; '.join(errors)}]"
    )


def _dist_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (package.replace("_", "-"), package):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def class_scores(value: Any) -> np.ndarray:
    """A non-tensor output as a tensor: a sequence of maps from class to score (what
    scikit-learn models converted by skl2onnx answer, ZipMap's
    ``seq(map(int64, tensor(float)))``) as one row of float32 scores per map, the classes
    in sorted order, so it is served, validated and compared like any classifier's
    output. Any other kind is refused, naming it."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        if all(sorted(v) == keys for v in value):
            return np.array([[float(v[k]) for k in keys] for v in value], dtype=np.float32)
    raise TypeError(
        f"an output of kind {type(value).__name__} is not a tensor nor a sequence of maps"
    )


class OnnxRunner:
    def __init__(
        self,
        model: Path | bytes,
        *,
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeUnavailable(f"onnxruntime is not installed: {exc}") from exc
        # onnxruntime only warns about an unknown provider and runs on the CPU instead: a
        # GPU node configured for CUDA would quietly serve from the CPU. Refuse instead.
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise RuntimeUnavailable(
                f"execution provider(s) {missing} not available in this onnxruntime build "
                f"(available: {available})"
            )
        options = ort.SessionOptions()
        # Threads come from the caller (the pod's CPU limit), never the host's core
        # count: on a shared edge node the host count oversubscribes the CPU quota.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        self._session = ort.InferenceSession(source, options, providers=list(providers))
        self.runtime = f"onnxruntime {ort.__version__}"
        self.providers = list(self._session.get_providers())
        self.inputs = [self._spec(i) for i in self._session.get_inputs()]
        self.outputs = [self._spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        dtype = _ORT_TYPES.get(arg.type, arg.type)
        shape = tuple(d if isinstance(d, int | str) else None for d in (arg.shape or []))
        return TensorSpec(arg.name, dtype, shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(
            self._output_names, feeds if type(feeds) is dict else dict(feeds)
        )
        return {
            name: value if isinstance(value, np.ndarray) else class_scores(value)
            for name, value in zip(self._output_names, values, strict=True)
        }

    def bind(
        self,
        input: str,
        dtype: np.dtype[Any],
        shape: Sequence[int],
        outputs: Mapping[str, tuple[np.dtype[Any], Sequence[int]]],
    ) -> OnnxBinding:
        """A :class:`OnnxBinding` of one input of this dtype and shape, read from wherever
        :meth:`OnnxBinding.run` is told, and of these outputs, written into arrays of
        their own."""
        return OnnxBinding(self._session, input, dtype, shape, outputs)


class OnnxBinding:
    """One run of a session, set up once and repeated: the input is read in place from a
    memory address (a request's body in a receive buffer) and the outputs are written
    into arrays allocated once, which every run returns again. The caller owns them until
    its next run; one binding serves one thread.

    Why: ``session.run`` converts its feeds to tensors and its results to new arrays on
    every call. A binding that stays the same skips that: on a 1.5 ms CNN it runs about
    25-40 us (2-3 %) faster than ``session.run`` on the same array, on a 30 us one about
    3 us. Rebinding the input costs all of that again (onnxruntime prepares a changed
    binding anew on its next run), so the input is rebound only when its address moves.

    A run raises where the outputs did not land in the arrays: one that comes out in
    another shape than the one allocated (its size depends on the data: onnxruntime
    refuses), or one that onnxruntime answers from other memory (an output that is the
    input itself; checked after the first run at each input address). The caller then
    goes back to ``run``."""

    def __init__(
        self,
        session: Any,
        input: str,
        dtype: np.dtype[Any],
        shape: Sequence[int],
        outputs: Mapping[str, tuple[np.dtype[Any], Sequence[int]]],
    ) -> None:
        import onnxruntime as ort

        inputs = {i.name for i in session.get_inputs()}
        if echoed := inputs.intersection(outputs):
            raise ValueError(f"output(s) {sorted(echoed)} are inputs too: nothing to bind")
        self._session = session
        self._binding = session.io_binding()
        self._input = (input, np.dtype(dtype), [int(d) for d in shape])
        self._address = 0
        self._checked = False  # the outputs seen in their arrays since the last rebind
        self.outputs = {name: np.empty(tuple(dims), dt) for name, (dt, dims) in outputs.items()}
        for name, array in self.outputs.items():
            self._binding.bind_output(
                name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data
            )
        # Quiet: a failed run is run again the general way by the caller, which logs the
        # error if it is the model's. (The graph id entry is onnxruntime's documented
        # "no graph capture": without any entry its Python side looks one up through a
        # C++ exception, 35 us per run in 1.32.)
        self._options = ort.RunOptions()
        self._options.log_severity_level = 4
        self._options.add_run_config_entry("gpu_graph_id", "-1")

    def run(self, address: int) -> dict[str, np.ndarray]:
        """Run on the input's bytes at ``address`` (valid and aligned for the input's
        dtype, for the whole call); the outputs are this binding's own arrays."""
        if address != self._address:
            name, dtype, shape = self._input
            self._binding.bind_input(name, "cpu", 0, dtype, shape, address)
            self._address = address
            self._checked = False
        self._session.run_with_iobinding(self._binding, self._options)
        if not self._checked:
            self._check()
        return self.outputs

    def _check(self) -> None:
        got = self._binding.get_outputs()
        for (name, array), value in zip(self.outputs.items(), got, strict=True):
            if value.data_ptr() != array.ctypes.data:
                raise RuntimeError(f"onnxruntime answered {name!r} from other memory")
        self._checked = True


class TfliteRunner:
    def __init__(self, model: Path | bytes, *, threads: int = 1) -> None:
        interpreter_cls, self.runtime = load_tflite_interpreter()
        kwargs: dict[str, Any] = {"num_threads": threads}
        if isinstance(model, Path):
            kwargs["model_path"] = str(model)
        else:
            kwargs["model_content"] = bytes(model)
        self._interp = interpreter_cls(**kwargs)
        self._interp.allocate_tensors()
        self.providers = ["cpu"]
        self._in = {d["name"]: d for d in self._interp.get_input_details()}
        self._out = self._interp.get_output_details()
        self.inputs = [self._spec(d) for d in self._in.values()]
        self.outputs = [self._spec(d) for d in self._out]
        self._shapes = {name: tuple(int(x) for x in d["shape"]) for name, d in self._in.items()}

    @staticmethod
    def _spec(detail: Mapping[str, Any]) -> TensorSpec:
        signature = detail.get("shape_signature")
        dims = signature if signature is not None and len(signature) else detail["shape"]
        shape = tuple(None if int(d) < 0 else int(d) for d in dims)
        return TensorSpec(str(detail["name"]), np.dtype(detail["dtype"]).name, shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        resized = False
        for name, value in feeds.items():
            if self._shapes[name] != value.shape:
                self._interp.resize_tensor_input(self._in[name]["index"], list(value.shape))
                self._shapes[name] = value.shape
                resized = True
        if resized:
            self._interp.allocate_tensors()
        for name, value in feeds.items():
            self._interp.set_tensor(self._in[name]["index"], value)
        self._interp.invoke()
        return {d["name"]: self._interp.get_tensor(d["index"]).copy() for d in self._out}


def preload_runtime(fmt: str) -> None:
    """Import the runtime library for ``fmt`` (raises RuntimeUnavailable)."""
    if fmt == "onnx":
        try:
            importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise RuntimeUnavailable(f"onnxruntime is not installed: {exc}") from exc
    elif fmt == "tflite":
        load_tflite_interpreter()
    else:
        raise RuntimeUnavailable(f"no runtime for model format {fmt!r} (expected onnx or tflite)")


def open_runner(
    model: Path | bytes,
    fmt: str,
    *,
    threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Runner:
    if fmt == "onnx":
        return OnnxRunner(model, threads=threads, providers=providers)
    if fmt == "tflite":
        return TfliteRunner(model, threads=threads)
    raise ValueError(f"unknown model format {fmt!r} (expected onnx or tflite)")


@dataclass(frozen=True)
class InputHints:
    """What a user may tell the probe about a model's inputs: concrete sizes for named
    dynamic dims (``dims``: by name, so an unnamed ``?`` dim takes none; give the whole
    shape instead), whole shapes, and constant values (e.g. a sample-rate scalar)."""

    dims: Mapping[str, int]
    shapes: Mapping[str, Sequence[int]]
    values: Mapping[str, Any]

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None) -> InputHints:
        hints = (meta or {}).get("validation") or {}
        return cls(
            dims=dict(hints.get("dims") or {}),
            shapes=dict(hints.get("shapes") or {}),
            values=dict(hints.get("values") or {}),
        )


def concrete_shape(
    spec: TensorSpec, hints: InputHints, *, default_dim: int, unknown_dim: int | None = None
) -> tuple[int, ...]:
    """A concrete shape for ``spec``: hints first (a dim's size only for a shared name,
    see :func:`shared_dim`), then 1 for a leading (batch) dim and ``default_dim`` (or
    ``unknown_dim`` for every dynamic dim, when given) elsewhere."""
    if spec.name in hints.shapes:
        return tuple(int(d) for d in hints.shapes[spec.name])
    out = []
    for index, dim in enumerate(spec.shape):
        name = shared_dim(dim)
        if (size := fixed_dim(dim)) is not None:
            out.append(size)
        elif name is not None and name in hints.dims:
            out.append(int(hints.dims[name]))
        elif unknown_dim is not None:
            out.append(unknown_dim)
        else:
            out.append(1 if index == 0 else default_dim)
    return tuple(out)


def generate_inputs(
    specs: Sequence[TensorSpec],
    hints: InputHints,
    *,
    default_dim: int,
    unknown_dim: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Deterministic inputs that respect each input's dtype and shape."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = concrete_shape(spec, hints, default_dim=default_dim, unknown_dim=unknown_dim)
        dtype = np.dtype(spec.dtype) if spec.dtype != "str" else np.dtype(object)
        if spec.name in hints.values:
            value = np.asarray(hints.values[spec.name], dtype=dtype)
            feeds[spec.name] = (
                value if value.shape == shape else np.broadcast_to(value, shape).copy()
            )
        elif dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[spec.name] = np.full(shape, "a", dtype=object)
    return feeds
