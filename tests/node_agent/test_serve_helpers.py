"""Shared pieces of the ``edgefleet-serve`` tests (no tests here): a tiny artifact origin
that behaves like the controller's artifact endpoint (ETag = "sha256", Range, If-Range),
models written to files, a runner wrapper with gates, and an in-process server."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from controller.registry import samples
from controller.registry.tflite_builder import build_tflite_mlp
from node_agent.runtimes import Runner, TensorSpec, open_runner
from node_agent.server.app import InferenceServer
from node_agent.server.model import RunnerFactory
from node_agent.server.settings import ServeSettings
from tests.http_fake import FakeHTTPServer, reply

SENTINEL = 42.0  # an input whose first element is this blocks in HookedRunner.run


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_lookup_model(rows: int = 10, width: int = 4) -> bytes:
    """``row = table[index]``: runs for 0 <= index < rows and fails *in the runtime*
    (Gather out of bounds) otherwise, whatever the server validated."""
    table = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["row"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@dataclass(frozen=True)
class Models:
    dir: Path
    cnn: Path
    cnn_v2: Path
    scorer: Path
    mlp: Path
    lookup: Path

    def bytes(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


def write_models(root: Path) -> Models:
    blobs = {
        "cnn": (samples.build_cnn(), "onnx"),
        "cnn_v2": (samples.build_cnn(seed=1), "onnx"),
        "scorer": (samples.build_sequence_scorer(), "onnx"),
        "mlp": (build_tflite_mlp(), "tflite"),
        "lookup": (build_lookup_model(), "onnx"),
    }
    paths = {}
    for name, (data, ext) in blobs.items():
        path = root / f"{name}.{ext}"
        path.write_bytes(data)
        paths[name] = path
    return Models(dir=root, **paths)


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs by name, from a plain onnxruntime session (the reference)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def image(batch: int = 1, seed: int = 0) -> np.ndarray:
    """An input for the CNN."""
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10, every_s: float = 0.01) -> bool:
    """Whether ``condition`` turns true within ``timeout_s``, asked every ``every_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


# np.load reads each member's header with ast.literal_eval, and CPython 3.11.7's AST
# builder is not safe across threads ("SystemError: AST constructor recursion depth
# mismatch", fixed in 3.11.8): the tests' client threads decode one answer at a time.
_NPZ_LOCK = threading.Lock()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with _NPZ_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


# ---------------------------------------------------------------------- runner hooks
class HookedRunner:
    """A real runner with two test hooks: ``hold`` blocks every run (warm-up included)
    until ``release`` is set; an input whose first element is SENTINEL blocks until
    ``sentinel_release`` is set (``sentinel_entered`` tells it arrived)."""

    def __init__(self, inner: Runner, hooks: Hooks) -> None:
        self.inner = inner
        self.hooks = hooks
        self.providers = getattr(inner, "providers", [])

    @property
    def runtime(self) -> str:
        return self.inner.runtime

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.inner.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.inner.outputs)

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        hooks = self.hooks
        hooks.entered.set()
        if hooks.hold:
            assert hooks.release.wait(30), "test never released the runner"
        first = next(iter(feeds.values()))
        if first.size and float(first.flat[0]) == SENTINEL:
            hooks.sentinel_entered.set()
            assert hooks.sentinel_release.wait(30), "test never released the sentinel"
        return self.inner.run(feeds)


@dataclass
class Hooks:
    hold: bool = False
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    sentinel_entered: threading.Event = field(default_factory=threading.Event)
    sentinel_release: threading.Event = field(default_factory=threading.Event)
    loads: list[Path] = field(default_factory=list)

    def factory(self) -> RunnerFactory:
        def make(path: Path, fmt: str, threads: int) -> Runner:
            self.loads.append(path)
            return HookedRunner(open_runner(path, fmt, threads=threads), self)

        return make


# ---------------------------------------------------------------------- server
def settings_for(tmp: Path, model_path: Path | None = None, **overrides: Any) -> ServeSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "cache_dir": tmp / "cache",
        "threads": 1,
        "model_name": "cnn",
        "model_version": "1",
        "download_backoff_s": 0.01,
        "shutdown_grace_s": 2.0,
        **overrides,
    }
    if model_path is not None:
        values["model_path"] = model_path
    return ServeSettings(**values)


@contextmanager
def running(
    settings: ServeSettings, *, load: bool = True, factory: RunnerFactory | None = None
) -> Iterator[InferenceServer]:
    server = (
        InferenceServer(settings, runner_factory=factory)
        if factory is not None
        else InferenceServer(settings)
    )
    server.start()
    try:
        if load:
            server.load()
        yield server
    finally:
        server.shutdown(grace_s=2.0)


# ---------------------------------------------------------------------- origin
@dataclass
class OriginRequest:
    path: str
    range: str | None
    if_range: str | None


class Origin:
    """Serves ``files`` like the controller's artifact endpoint: ETag is the quoted
    sha256, ``Range: bytes=N-`` answers 206 unless ``If-Range`` names another ETag.
    Faults: ``cut_after`` (the next response stops after that many body bytes and the
    connection closes), ``ignore_range`` (always 200), ``fail_times`` (that many 503s),
    ``gate`` (requests wait until it is set)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[OriginRequest] = []
        self.cut_after: int | None = None
        self.ignore_range = False
        self.fail_times = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()
        self._http: FakeHTTPServer | None = None

    def __enter__(self) -> Origin:
        self._http = FakeHTTPServer(self.handle, keep_alive=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self._http is not None:
            self._http.close()

    @property
    def port(self) -> int:
        assert self._http is not None, "use the Origin as a context manager"
        return self._http.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, data: bytes) -> str:
        self.files["/" + path.lstrip("/")] = data
        return self.url(path)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(
                OriginRequest(h.path, h.headers.get("Range"), h.headers.get("If-Range"))
            )
            cut, self.cut_after = self.cut_after, None
            fail = self.fail_times > 0
            self.fail_times -= 1 if fail else 0
        if self.gate is not None:
            self.gate.wait(30)
        if fail:
            reply(h, 503, b"busy")
            return
        data = self.files.get(h.path)
        if data is None:
            reply(h, 404, b"no such artifact")
            return
        etag = f'"{sha256(data)}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if_range = h.headers.get("If-Range")
        if match and not self.ignore_range and (if_range is None or if_range == etag):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                reply(h, 416, b"", headers=headers)
                return
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if cut is not None:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            return
        reply(h, status, body, headers=headers)
