"""One loaded, warmed-up model version, how to get one from a URL or a file, and the
server's slot for it.

An :class:`ActiveModel` is immutable once built: the :class:`ModelSlot` swaps a reference
to it, so a request that picked up the old version finishes on the old version."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from node_agent.cache import ArtifactCache, RetryPolicy
from node_agent.runtimes import InputHints, Runner, generate_inputs, open_runner
from node_agent.server.metrics import ServerMetrics
from node_agent.server.settings import ServeSettings
from node_agent.server.tensors import RawAnswer, RawPlan

log = logging.getLogger(__name__)
_serve_log = logging.getLogger("node_agent.serve")  # swaps: a line of the server's own

State = Literal["starting", "loading", "ready", "failed", "draining", "stopped"]

RunnerFactory = Callable[[Path, str, int], Runner]
"""(model file, format, intra-op threads) -> Runner."""

_NO_HINTS = InputHints(dims={}, shapes={}, values={})
MAX_BOUND_OUTPUT = 1024 * 1024
"""The largest answer (bytes) a connection keeps an output array for between requests, as
its receive buffer is kept (see ``connection.KEEP_BUFFER``); a larger one is allocated per
run."""
BINDINGS_PER_CONNECTION = 4
"""A connection's bindings, the most recently made kept (a client that alternates a few
header sets keeps each one's)."""
BOUND_BYTES = 64 * 1024 * 1024
"""The output arrays all bindings of a version may hold between requests, idle
connections' too; past it, requests run unbound."""


class Binding(Protocol):
    """A runtime's run set up once for one input and its outputs (``OnnxBinding``)."""

    outputs: dict[str, np.ndarray]

    def run(self, address: int) -> dict[str, np.ndarray]: ...


@dataclass(slots=True)
class BoundPlan:
    """A connection's binding for one raw plan: its requests run in place on their body
    and are answered from the binding's own output array with ``answer``'s head."""

    plan: RawPlan
    answer: RawAnswer
    binding: Binding
    payload: memoryview  # the output array's bytes: every answer's payload
    alignment: int  # the input dtype's: a body elsewhere takes the general path

    def run(self, address: int) -> bool:
        """Run on the body at ``address``; ``False`` where it is not aligned for the input
        (pipelined bodies may land anywhere). The answer is in ``payload``. Raises what
        the run raises: see :meth:`failed`."""
        if address % self.alignment:
            return False
        self.binding.run(address)
        return True

    def failed(self, error: Exception) -> None:
        """A bound run raised ``error`` where the same request run the general way then
        passed: the binding is what failed (an output whose shape depends on the data),
        so the plan is bound no more, on any connection. (Where the general run fails
        too, the error is the model's own, and the binding stays.)"""
        self.plan.bindable = False
        log.info("raw requests of this shape run unbound from now on: %s", error)


class ModelLoadError(RuntimeError):
    """The runtime could not load the model, or it failed its warm-up."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    version: str
    format: str | None = None  # None: detected from the bytes
    url: str | None = None
    sha256: str | None = None
    path: Path | None = None  # a local file instead of a download
    hints: InputHints = _NO_HINTS  # the warm-up inputs' sizes and values


def default_runner_factory(
    path: Path, fmt: str, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> Runner:
    return open_runner(path, fmt, threads=threads, providers=providers)


def detect_format(path: Path) -> str:
    """TFLite flatbuffers carry ``TFL3`` at byte 4; anything else is tried as ONNX."""
    with path.open("rb") as fh:
        head = fh.read(8)
    return "tflite" if head[4:8] == b"TFL3" else "onnx"


@dataclass
class ActiveModel:
    name: str
    version: str
    sha256: str
    format: str
    path: Path
    runner: Runner
    threads: int
    load_s: float
    warmup_s: float
    warmup_runs: int
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    thread_safe: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The raw-tensor hot path's memory, per version: request headers -> what they decode
    # to and how they were answered (init=False: a copy relabelled by dataclasses.replace
    # starts empty, its answers carry other X-Model-* headers).
    raw_plans: dict[tuple[str | None, ...], RawPlan] = field(
        default_factory=dict, init=False, repr=False
    )
    # Each connection's bindings (by its id, then by its plan's): kept by the version, so
    # that a swap lets them go with it instead of an idle connection holding the old one.
    bindings: dict[int, dict[int, BoundPlan]] = field(default_factory=dict, init=False, repr=False)
    bound_bytes: int = field(default=0, init=False, repr=False)  # their output arrays
    _bind_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    answer_head: str | None = field(default=None, init=False, repr=False)  # X-Model-* lines

    @property
    def runtime(self) -> str:
        return self.runner.runtime

    @property
    def providers(self) -> list[str]:
        return [str(p) for p in getattr(self.runner, "providers", [])]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # onnxruntime sessions run concurrently; a TFLite interpreter holds its tensors
        # in the object, so its runs are serialized.
        if self.thread_safe:
            return self.runner.run(feeds)
        with self._lock:
            return self.runner.run(feeds)

    def binding_of(self, owner: int, plan: RawPlan) -> BoundPlan | None:
        """``owner``'s binding for ``plan``, if it has one."""
        held = self.bindings.get(owner)
        found = held.get(id(plan)) if held is not None else None
        return found if found is not None and found.plan is plan else None

    def bound(self, owner: int, plan: RawPlan, answer: RawAnswer) -> BoundPlan | None:
        """``owner``'s binding for ``plan``, whose requests were answered with ``answer``,
        made on first use; ``None`` where the runtime binds nothing (TFLite), the answer
        is too large to keep or over the version's budget, or a bound run failed."""
        found = self.binding_of(owner, plan)
        if found is not None:
            return found if plan.bindable else None
        bind = getattr(self.runner, "bind", None)
        if bind is None or not plan.bindable or not self.thread_safe:
            return None
        size = answer.nbytes
        if size > MAX_BOUND_OUTPUT or not size:
            return None
        with self._bind_lock:
            if self.bound_bytes + size > BOUND_BYTES:
                return None
            self.bound_bytes += size
        try:
            binding: Binding = bind(
                plan.input, plan.dtype, plan.shape, {answer.output: (answer.dtype, answer.shape)}
            )
        except Exception as exc:
            self._release(size)
            plan.bindable = False
            log.debug("no binding for %s %s: %s", self.name, self.version, exc)
            return None
        payload = binding.outputs[answer.output].data.cast("B")
        made = BoundPlan(plan, answer, binding, payload, plan.dtype.alignment)
        held = self.bindings.setdefault(owner, {})  # (only the owner's thread writes it)
        if (stale := held.pop(id(plan), None)) is not None:  # a dead plan's id, reused
            self._release(stale.answer.nbytes)
        while len(held) >= BINDINGS_PER_CONNECTION:
            self._release(held.pop(next(iter(held))).answer.nbytes)
        held[id(plan)] = made
        return made

    def unbind(self, owner: int) -> None:
        """Let go of ``owner``'s bindings (its connection closed)."""
        for gone in self.bindings.pop(owner, {}).values():
            self._release(gone.answer.nbytes)

    def _release(self, size: int) -> None:
        with self._bind_lock:
            self.bound_bytes -= size

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "format": self.format,
            "runtime": self.runtime,
            "providers": self.providers,
            "threads": self.threads,
            "inputs": [s.as_dict() for s in self.runner.inputs],
            "outputs": [s.as_dict() for s in self.runner.outputs],
            "loaded_at": self.loaded_at.isoformat(),
            "load_s": round(self.load_s, 4),
            "warmup_s": round(self.warmup_s, 4),
            "warmup_runs": self.warmup_runs,
        }


def resolve_artifact(source: ModelSource, cache: ArtifactCache) -> tuple[Path, str]:
    """The verified model file and its sha256 (``ChecksumMismatch`` /
    ``ArtifactUnavailable`` from the cache)."""
    if source.path is not None:
        return source.path, cache.verify_local(source.path, source.sha256)
    if not source.url or not source.sha256:
        raise ValueError("a model source needs a path, or a url and a sha256")
    return cache.fetch(source.url, source.sha256), source.sha256


def warm_up(runner: Runner, runs: int, *, default_dim: int, hints: InputHints = _NO_HINTS) -> None:
    """``runs`` inferences on generated inputs (sized and valued by the version's
    validation ``hints``, every other dynamic non-batch dim at ``default_dim``, then, if
    the model refuses that, at 1), so the first real request does not pay for lazy
    allocations."""
    if runs <= 0:
        return
    failures = []
    for unknown in (None, 1):
        feeds = generate_inputs(runner.inputs, hints, default_dim=default_dim, unknown_dim=unknown)
        try:
            runner.run(feeds)
        except Exception as exc:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            failures.append(f"inputs {shapes}: {type(exc).__name__}: {exc}")
            continue
        for _ in range(runs - 1):
            runner.run(feeds)
        return
    raise ModelLoadError("warm-up failed: " + "; ".join(failures))


def load_model(
    source: ModelSource,
    cache: ArtifactCache,
    *,
    threads: int,
    warmup_runs: int,
    warmup_dim: int = 64,
    runner_factory: RunnerFactory = default_runner_factory,
) -> ActiveModel:
    path, sha256 = resolve_artifact(source, cache)
    fmt = source.format or detect_format(path)
    started = time.perf_counter()
    try:
        runner = runner_factory(path, fmt, threads)
    except Exception as exc:
        raise ModelLoadError(
            f"{fmt} runtime could not load {source.name} {source.version}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    loaded = time.perf_counter()
    warm_up(runner, warmup_runs, default_dim=warmup_dim, hints=source.hints)
    warmed = time.perf_counter()
    log.info(
        "loaded %s %s (%s, sha256 %s) with %s, %d thread(s): load %.3fs, %d warm-up runs %.3fs",
        source.name,
        source.version,
        fmt,
        sha256[:12],
        runner.runtime,
        threads,
        loaded - started,
        warmup_runs,
        warmed - loaded,
    )
    return ActiveModel(
        name=source.name,
        version=source.version,
        sha256=sha256,
        format=fmt,
        path=path,
        runner=runner,
        threads=threads,
        load_s=loaded - started,
        warmup_s=warmed - loaded,
        warmup_runs=warmup_runs,
        thread_safe=bool(getattr(runner, "thread_safe", fmt == "onnx")),
    )


class SwapInProgress(RuntimeError):
    pass


class ModelSlot:
    """The version being served: ``load()`` makes the first one current and the slot
    ready, ``swap()`` replaces it while requests run. ``state`` is the server's (its
    listener drains it)."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServerMetrics,
        *,
        cache: ArtifactCache | None = None,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = cache or ArtifactCache(
            settings.cache_dir,
            retry=RetryPolicy(
                attempts=settings.download_attempts, backoff_s=settings.download_backoff_s
            ),
            timeout_s=settings.download_timeout_s,
            max_bytes=settings.max_artifact_bytes,
            bearer_token=settings.artifact_token.get_secret_value()
            if settings.artifact_token
            else None,
        )
        providers = tuple(settings.providers)
        self.runner_factory: RunnerFactory = runner_factory or (
            lambda path, fmt, threads: default_runner_factory(path, fmt, threads, providers)
        )
        self.threads = settings.resolved_threads()
        self.state: State = "starting"
        self._model: ActiveModel | None = None
        self._load_lock = threading.Lock()

    @property
    def current(self) -> ActiveModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._model is not None

    def source_from_settings(self) -> ModelSource:
        s = self.settings
        return ModelSource(
            name=s.model_name,
            version=s.model_version,
            format=s.format,
            url=s.model_url,
            sha256=s.sha256,
            path=s.model_path,
            hints=InputHints.from_metadata({"validation": s.warmup_inputs}),
        )

    def _load(self, source: ModelSource) -> ActiveModel:
        return load_model(
            source,
            self.cache,
            threads=self.threads,
            warmup_runs=self.settings.warmup_runs,
            warmup_dim=self.settings.warmup_dim,
            runner_factory=self.runner_factory,
        )

    def load(self, source: ModelSource | None = None) -> ActiveModel:
        """Fetch, load and warm up the initial model; ready afterwards. Raises
        ``ChecksumMismatch``, ``ArtifactUnavailable`` or ``ModelLoadError``."""
        with self._load_lock:
            self.state = "loading"
            try:
                model = self._load(source or self.source_from_settings())
            except BaseException:
                self.state = "failed"
                raise
            self._activate(model)
            if self.state == "loading":
                self.state = "ready"
                self.metrics.ready.set(1)
            return model

    def swap(self, source: ModelSource) -> ActiveModel:
        """Stage-then-activate: the new version is downloaded, loaded and warmed up beside
        the serving one, then one reference assignment makes it current. Requests already
        running finish on the old runner, which is freed with its last request."""
        if not self._load_lock.acquire(blocking=False):
            raise SwapInProgress("a model load or swap is already in progress")
        try:
            old = self._model
            if old is not None and old.sha256 == source.sha256:
                # Same bytes: only the labels change, no second copy in memory.
                model = dataclasses.replace(old, name=source.name, version=source.version)
            else:
                model = self._load(source)
            self._activate(model)
            self.metrics.swaps.inc()
            if self.state in ("loading", "failed", "starting"):
                self.state = "ready"
                self.metrics.ready.set(1)
            _serve_log.info(
                "swapped %s %s -> %s %s",
                old.name if old else "-",
                old.version if old else "-",
                model.name,
                model.version,
            )
            return model
        finally:
            self._load_lock.release()

    def _activate(self, model: ActiveModel) -> None:
        self._model = model
        self.metrics.set_model(
            model=model.name,
            version=model.version,
            sha256=model.sha256,
            runtime=model.runtime,
            provider=model.providers[0] if model.providers else "",
        )
