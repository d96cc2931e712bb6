"""The HTTP side of ``edgefleet-serve``: routes and endpoints over the connection layer
of :mod:`node_agent.server.connection` (one thread per connection, HTTP/1.1 keep-alive,
bodies read in place, each response sent with one ``sendmsg``, busy polling between a
client's requests), nothing else to install on an edge node.

Endpoints::

    GET  /healthz          200 while the process runs
    GET  /readyz           200 once a model is loaded and warmed up, 503 before and while draining
    GET  /metrics          Prometheus text
    GET  /v1/model         the served version and its signature
    POST /v1/infer         JSON {"inputs": {...}}, application/x-npz, one tensor as
                           application/x-npy or as raw bytes (application/octet-stream with
                           X-Tensor-Dtype and X-Tensor-Shape); answers in kind
    POST /v1/admin/swap    stage-then-activate a new version (loopback or bearer token)

The body forms are described in :mod:`node_agent.server.tensors`; raw bytes are the
cheapest (no decoding beyond ``np.frombuffer``), for clients that know the signature.

The raw form's hot path, in three steps that each keep only what the last request
proved (a request that differs in anything takes the general path, and the general
path's answer is the reference the tests hold each step to):

1. a *plan* per model version and header set: a body of the planned length is one
   ``np.frombuffer`` from the runtime, and an answer like the last one reuses its head;
2. a *binding* per connection and plan (onnxruntime IOBinding, ``OnnxBinding``): the body
   is read by the runtime where it lies and the answer written into an array kept for the
   next one, about 2-3 % of a 1.5 ms CNN's run less than ``session.run``;
3. a *replay*: a head byte for byte the last one's, which ran on the binding, goes
   straight to it, without routing or header checks again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from node_agent.cache import ArtifactCache, ArtifactUnavailable, ChecksumMismatch, RetryPolicy
from node_agent.server.connection import PHRASES, Connection, HttpError, Request
from node_agent.server.metrics import ServerMetrics
from node_agent.server.model import (
    ActiveModel,
    BoundPlan,
    ModelLoadError,
    ModelSource,
    RunnerFactory,
    default_runner_factory,
    load_model,
)
from node_agent.server.npz import Body
from node_agent.server.settings import ServeSettings
from node_agent.server.tensors import (
    DTYPE_HEADER,
    JSON_TYPE,
    NAME_HEADER,
    NPY_TYPE,
    NPZ_TYPE,
    RAW_TYPE,
    SHAPE_HEADER,
    SINGLE_TENSOR_TYPES,
    RawPlan,
    RequestError,
    decode_json,
    decode_npz,
    decode_tensor,
    encode_json,
    encode_npy,
    encode_npz,
    encode_raw,
    media_type,
    raw_feeds,
    response_type,
    validate,
)

log = logging.getLogger("node_agent.serve")

State = Literal["starting", "loading", "ready", "failed", "draining", "stopped"]
LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
_CTL = re.compile(r"[\x00-\x1f\x7f]")


def _busy(detail: bytes) -> bytes:
    body = b'{"error": "too_many_connections", "detail": "%s"}' % detail
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


_BUSY = _busy(b"retry later")
_CLIENT_BUSY = _busy(b"too many connections from this address; retry later")
_PLANNED: dict[str, np.ndarray] = {}  # the feeds of a plan's request, before decoding


@dataclass(slots=True)
class _Replay:
    """What a connection's last request was, when the same head again may skip to its
    binding (see _Handler._infer_again): the parsed head, its plan, its body's length."""

    request: Request
    plan: RawPlan
    length: int


_MAX_PLANS = 64  # raw plans per version; a client cycling through more header sets than
# that takes the general path more often
_UNSUPPORTED = (
    f"send {JSON_TYPE}, {NPZ_TYPE}, {NPY_TYPE} (one tensor) or {RAW_TYPE} (one tensor, "
    "with X-Tensor-Dtype and X-Tensor-Shape)"
)


def _header_lines(headers: dict[str, str]) -> str:
    """Header lines, each ending in CRLF. Values such as a model version come from
    configuration: never let one break the header block (control characters)."""
    return "".join(
        f"{k}: {v if v.isprintable() else _CTL.sub(' ', v)}\r\n"
        for k, v in ((k, str(v)) for k, v in headers.items())
    )


class SwapInProgress(RuntimeError):
    pass


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    format: Literal["onnx", "tflite"] | None = None
    model_version: str = Field(min_length=1)
    model_name: str | None = None


class InferenceServer:
    """The model slot plus the HTTP listener. ``start()`` listens at once (liveness
    answers while the artifact downloads), ``load()`` makes it ready, ``swap()`` replaces
    the version, ``shutdown()`` drains."""

    def __init__(
        self,
        settings: ServeSettings,
        *,
        cache: ArtifactCache | None = None,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
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
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._idle = threading.Condition(self._inflight_lock)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.handlers: set[_Handler] = set()  # open connections

    # ------------------------------------------------------------------ listener
    def start(self) -> None:
        server_class = _HTTPServer6 if ":" in self.settings.host else _HTTPServer
        httpd = server_class((self.settings.host, self.settings.port), _Handler)
        httpd.app = self
        httpd.slots = threading.Semaphore(self.settings.max_connections)
        httpd.per_client = self.settings.max_connections_per_client
        httpd.clients = {}
        httpd.clients_lock = threading.Lock()
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.25}, name="http", daemon=True
        )
        self._thread.start()
        log.info("listening on %s", self.url)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() first"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ model slot
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
            log.info(
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

    def model_head(self, model: ActiveModel) -> str:
        """The ``X-Model-*`` header lines of an inference answer, formatted once per
        version."""
        head = model.answer_head  # (kept by the version: nothing here holds an old one)
        if head is None:
            head = model.answer_head = _header_lines(
                {
                    "X-Model-Name": model.name,
                    "X-Model-Version": model.version,
                    "X-Model-Sha256": model.sha256,
                }
            )
        return head

    # ------------------------------------------------------------------ admin guard
    def admin_allowed(self, client: str, authorization: str | None) -> bool:
        if self.settings.admin_allow_loopback and client in LOOPBACK:
            return True
        token = self.settings.admin_token
        if token is None or not token.get_secret_value() or not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.get_secret_value().encode()
        )

    # ------------------------------------------------------------------ lifecycle
    def begin_request(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def end_request(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            # shutdown() sets the state before it waits, under this lock, for zero.
            if not self._inflight and self.draining:
                self._idle.notify_all()

    def settle(self, timeout_s: float = 0.1) -> None:
        """Wait (briefly) until every inference answer sent so far is in the metrics:
        they are counted right after their answer leaves, so that a scrape after a
        response always sees it."""
        pending = [(h, h.sent) for h in list(self.handlers) if h.counted < h.sent]
        deadline = time.monotonic() + timeout_s
        for handler, sent in pending:
            while handler.counted < sent and time.monotonic() < deadline:
                time.sleep(0.0002)

    @property
    def idle(self) -> bool:
        """No request in flight (a connection may busy-poll for its next one)."""
        return not self._inflight

    @property
    def draining(self) -> bool:
        return self.state in ("draining", "stopped")

    def shutdown(self, grace_s: float | None = None) -> None:
        """Readiness off, stop accepting, let requests in flight finish (up to
        ``grace_s``), close. Idle keep-alive connections are not waited for."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.state = "draining"
        self.metrics.ready.set(0)
        httpd = self._httpd
        if httpd is not None:
            httpd.shutdown()
        deadline = time.monotonic() + grace
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            if self._inflight:
                log.warning("%d request(s) still running after %.1fs", self._inflight, grace)
        if httpd is not None:
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state = "stopped"
        log.info("stopped")


class _HTTPServer(socketserver.ThreadingTCPServer):
    """One thread per connection, at most ``max_connections`` at a time and
    ``max_connections_per_client`` from one address: one more is answered 503 and closed
    at once (each connection holds a thread and a buffer). Per connection, not per
    request: the accepting thread counts, the connection's own thread counts it out."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: InferenceServer
    slots: threading.Semaphore
    per_client: int
    clients: dict[str, int]  # open connections by client address (none: absent)
    clients_lock: threading.Lock

    def process_request(self, request: Any, client_address: Any) -> None:
        client = client_address[0]
        with self.clients_lock:
            if (count := self.clients.get(client, 0)) < self.per_client:
                self.clients[client] = count + 1
        if count >= self.per_client:
            self.app.metrics.client_connections_refused.inc()
            self._turn_away(request, _CLIENT_BUSY)
            return
        if not self.slots.acquire(blocking=False):
            self._leave(client)
            self.app.metrics.connections_refused.inc()
            self._turn_away(request, _BUSY)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            self._leave(client)
            raise

    def _turn_away(self, request: Any, answer: bytes) -> None:
        with contextlib.suppress(OSError):
            request.send(answer, socket.MSG_DONTWAIT)
        self.shutdown_request(request)

    def _leave(self, client: str) -> None:
        with self.clients_lock:
            if count := self.clients[client] - 1:
                self.clients[client] = count
            else:
                del self.clients[client]  # (the map holds open clients only)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
            self._leave(client_address[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping its keep-alive connection is routine, not a traceback on stderr.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("connection from %s ended: %s", client_address, error)
        else:
            log.error("error on a connection from %s", client_address, exc_info=error)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(socketserver.BaseRequestHandler):
    """One connection: its requests in order (see :mod:`node_agent.server.connection`)."""

    server: _HTTPServer
    request: socket.socket
    conn: Connection
    command = ""  # the current request's method, target and headers
    path = ""
    _fields: dict[str, str]
    close_connection = True
    _http10 = False  # an HTTP/1.0 request (keep-alive only when it asks, and said back)
    _unread = False  # the request has a body the handler has not read
    sent = counted = 0  # inference answers sent / counted in the metrics
    _latencies = (0.0, 0.0)  # the last answer's inference and request seconds
    _request: Request  # the current request
    _replay: _Replay | None = None  # what the same head again may skip to

    def handle(self) -> None:
        app = self.server.app
        settings = app.settings
        conn = self.conn = Connection(
            self.request,
            idle_timeout_s=settings.idle_timeout_s,
            busy_poll_s=settings.busy_poll_us / 1e6,
            head_timeout_s=settings.head_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            body_min_bytes_per_s=settings.body_min_bytes_per_s,
        )
        app.handlers.add(self)
        try:
            self._serve(conn)
        finally:
            app.handlers.discard(self)
            if (model := app.current) is not None:
                model.unbind(id(self))

    def _serve(self, conn: Connection) -> None:
        app = self.server.app
        try:
            while True:
                try:
                    request = conn.next_request(poll=app.idle)
                except HttpError as exc:
                    self.command, self.close_connection = "", True
                    self._refuse(exc.status, exc.message, "head")
                    return
                if request is None:
                    return
                self._request = request
                self.command, self.path = request.method, request.target
                self._fields = request.headers
                self._http10 = request.version == "HTTP/1.0"
                self.close_connection = not request.keep_alive
                # A body nobody reads must not be taken for the next request: the
                # connection closes after the answer unless the handler reads the body.
                self._unread = "transfer-encoding" in request.headers or request.headers.get(
                    "content-length", "0"
                ) not in ("0", "")
                app.begin_request()  # (not a context manager: this is every request's path)
                try:
                    self._route(request.method)
                finally:
                    app.end_request()
                    self._count_polling()  # (after the answer: off the client's path)
                if self.close_connection or self._unread:
                    return
        finally:
            self._count_polling()

    def _count_polling(self) -> None:
        conn, metrics = self.conn, self.server.app.metrics
        if conn.polled_s:
            metrics.busy_poll_seconds.inc(conn.polled_s)
            conn.polled_s = 0.0
        if conn.poll_hits:
            metrics.busy_poll_hits.inc(conn.poll_hits)
            conn.poll_hits = 0

    def header(self, name: str) -> str | None:
        """A request header by its lower-case name (repeated headers joined by ", ")."""
        return self._fields.get(name)

    # ------------------------------------------------------------------ routing
    def _route(self, method: str) -> None:
        replay, self._replay = self._replay, None  # (set again by the answer it allows)
        try:
            if replay is not None and self._request is replay.request:
                self._infer_again(replay)
            elif (handler := self._lookup(method)) is not None:
                handler(self)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except HttpError as exc:  # (a body over its deadline)
            self._refuse(exc.status, exc.message, "body")
        except Exception:
            log.exception("unhandled error on %s %s", method, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._error(RequestError(500, "internal_error", "internal server error"))

    def _lookup(self, method: str) -> Callable[[_Handler], None] | None:
        """The endpoint for this request, or ``None`` once it is answered 404 or 405."""
        path = self.path
        routes = _ROUTES.get(path)  # origin-form without a query: no parsing needed
        if routes is None:
            path = urlsplit(path).path
            routes = _ROUTES.get(path)
        if routes is None:
            self._error(RequestError(404, "not_found", f"no route {path}"))
            return None
        handler = routes.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = ", ".join(sorted(routes))
            self._error(
                RequestError(405, "method_not_allowed", f"{path} takes {allowed}"),
                headers={"Allow": allowed},
            )
        return handler

    # ------------------------------------------------------------------ responses
    def _respond(
        self,
        status: int,
        body: bytes | memoryview,
        content_type: str = JSON_TYPE,
        headers: dict[str, str] | None = None,
        head: str = "",
    ) -> None:
        """One response; ``head`` is header lines already formatted (``_header_lines``)."""
        data = self._head(status, content_type, len(body), headers, head)
        self.conn.send(data, b"" if self.command == "HEAD" else body)

    def _head(
        self,
        status: int,
        content_type: str,
        length: int,
        headers: dict[str, str] | None = None,
        head: str = "",
    ) -> bytes:
        if self.server.app.draining or self._unread:
            self.close_connection = True
        text = (
            f"HTTP/1.1 {status} {PHRASES.get(status, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{head}"
        )
        if headers:
            text += _header_lines(headers)
        if self.close_connection:
            text += "Connection: close\r\n"
        elif self._http10:
            text += "Connection: keep-alive\r\n"
        return (text + "\r\n").encode("latin-1", "replace")

    def _json(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        self._respond(status, json.dumps(document).encode(), JSON_TYPE, headers)

    def _error(self, error: RequestError, headers: dict[str, str] | None = None) -> None:
        self._json(error.status, error.as_dict(), headers)

    def _refuse(self, status: int, message: str, phase: str) -> None:
        """A request the connection cannot go on after (a malformed head, a head or body
        over its deadline: ``phase``), answered in the API's JSON shape; the connection
        closes."""
        self.close_connection = True
        if status == 408:
            self.server.app.metrics.request_timeouts.labels(phase).inc()
        try:
            name = HTTPStatus(status).name.lower()
        except ValueError:
            name = "error"
        with contextlib.suppress(OSError):
            self._json(status, {"error": name, "detail": message})

    # ------------------------------------------------------------------ body
    def _too_large(self, length: int) -> RequestError:
        limit = self.server.app.settings.max_body_bytes
        return RequestError(
            413, "payload_too_large", f"body of {length} bytes is over the {limit}-byte limit"
        )

    def _read_body(self) -> memoryview:
        """The body, in place in the connection's buffer: valid until the next request.
        ``Expect: 100-continue`` is answered here, once the route wants the body (an
        oversized one is refused before the client sends it)."""
        encoding = self.header("transfer-encoding")
        if encoding is not None:
            self.close_connection = True
            if "chunked" in encoding.lower():
                raise RequestError(411, "length_required", "send a Content-Length, not chunks")
            raise RequestError(400, "bad_request", f"Transfer-Encoding {encoding[:40]!r}")
        raw = self.header("content-length")
        if raw is None:
            raise RequestError(411, "length_required", "a Content-Length header is required")
        if not (raw.isdigit() and raw.isascii() and len(raw) <= 18):  # int() takes "+1_0"
            self.close_connection = True
            raise RequestError(400, "bad_request", f"bad Content-Length {raw[:40]!r}")
        length = int(raw)
        expect = self.header("expect")
        if length > self.server.app.settings.max_body_bytes:
            self.close_connection = True
            if expect is None:
                self.conn.discard(length, budget_s=2.0)
            raise self._too_large(length)
        if expect is not None and expect.lower() == "100-continue" and not self._http10:
            self.conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = self.conn.read_body(length)
        except ConnectionError as exc:
            self.close_connection = True
            raise RequestError(400, "bad_request", "the body ended before Content-Length") from exc
        self._unread = False
        return body

    # ------------------------------------------------------------------ endpoints
    def healthz(self) -> None:
        self._json(200, {"status": "alive", "state": self.server.app.state})

    def readyz(self) -> None:
        app = self.server.app
        model = app.current
        if app.ready and model is not None:
            self._json(200, {"status": "ready", "model": model.name, "version": model.version})
        else:
            self._json(503, {"status": "not ready", "state": app.state})

    def metrics(self) -> None:
        app = self.server.app
        app.settle()
        self._respond(200, app.metrics.render(), CONTENT_TYPE_LATEST)

    def model(self) -> None:
        model = self.server.app.current
        if model is None:
            self._error(RequestError(503, "not_ready", "no model is loaded yet"))
            return
        self._json(200, {**model.describe(), "ready": self.server.app.ready})

    def infer(self) -> None:
        started = time.perf_counter()
        app = self.server.app
        model = app.current  # this request runs on this version, whatever swaps meanwhile
        fields = self._fields
        try:
            if model is None or not app.ready:
                # Read the body anyway, so the connection stays usable.
                self._read_body()
                raise RequestError(503, "not_ready", "the model is not loaded and warmed up yet")
            plan = key = None
            if fields.get("content-type") == RAW_TYPE:  # the hot path: headers seen before?
                key = (
                    fields.get(DTYPE_HEADER),
                    fields.get(SHAPE_HEADER),
                    fields.get(NAME_HEADER),
                    fields.get("accept"),
                )
                plan = model.raw_plans.get(key)
            body = self._read_body()
            if plan is not None and len(body) == plan.nbytes:
                feeds, answer = _PLANNED, plan.answer  # (decoded in _answer, unless bound)
            else:
                feeds, answer, plan = self._decode(model, body, key)
        except RequestError as exc:
            app.metrics.rejected.labels(str(exc.status)).inc()
            self._error(exc)
            return
        bound = self._answer(started, model, body, feeds, answer, plan)
        if bound is not None and "expect" not in fields:
            # The same head again on this connection is the same request: it runs on the
            # same binding without being parsed, routed or decoded again.
            self._replay = _Replay(self._request, bound.plan, len(body))

    def _infer_again(self, replay: _Replay) -> None:
        """A request whose head is byte for byte the last one's, which ran on this
        connection's binding: everything its head says was checked then. Anything else
        (another version, draining, the binding gone) takes the way of any request."""
        started = time.perf_counter()
        app = self.server.app
        model = app.current
        plan = replay.plan
        bound = model.binding_of(id(self), plan) if model is not None and app.ready else None
        if model is None or bound is None or not plan.bindable:  # (ready: not draining)
            if (handler := self._lookup(self.command)) is not None:
                handler(self)
            return
        try:
            body = self.conn.read_body(replay.length)
        except ConnectionError:
            self.close_connection = True
            app.metrics.rejected.labels("400").inc()
            self._error(RequestError(400, "bad_request", "the body ended before Content-Length"))
            return
        self._unread = False
        if self._answer(started, model, body, _PLANNED, plan.answer, plan, bound) is not None:
            self._replay = replay

    def _answer(
        self,
        started: float,
        model: ActiveModel,
        body: memoryview,
        feeds: dict[str, np.ndarray],
        answer: str,
        plan: RawPlan | None,
        bound: BoundPlan | None = None,
    ) -> BoundPlan | None:
        """Run a request that passed its checks and send the answer. ``feeds`` is
        ``_PLANNED`` for a request of ``plan`` (its body not decoded yet); ``bound``, the
        connection's binding of it where the caller has looked it up already. Returns the
        binding it ran on, if it did."""
        metrics = self.server.app.metrics
        # An answer like the last one to these headers reuses its head, and a plan's
        # request runs on this connection's binding of it; decided before the run, so
        # that the least Python runs on caches the inference evicts.
        planned = feeds is _PLANNED
        last = None
        if plan is not None and self._plain_head:
            last = plan.last
            if bound is None and planned and last is not None:
                bound = model.bound(id(self), plan, last)
        if last is None or not planned:
            bound = None  # (its answer's head is reused: a plain one only)
        t0 = time.perf_counter()
        failed: Exception | None = None
        ran = False
        if bound is not None:
            try:
                ran = bound.run(self.conn.body_address)
            except Exception as exc:  # the binding's failure or the model's: run it again
                failed = exc
        try:
            payload: bytes | memoryview | None = None
            if ran and bound is not None:
                t1 = time.perf_counter()
                data, payload, nbytes = bound.answer.head, bound.payload, bound.answer.nbytes
            else:
                if planned and plan is not None:
                    feeds = raw_feeds(body, plan)
                outputs = model.run(feeds)
                if failed is not None and bound is not None:
                    bound.failed(failed)  # (this run passed: the binding is what failed)
                bound = None
                t1 = time.perf_counter()
                if last is not None and (payload := last.matches(outputs)) is not None:
                    data, nbytes = last.head, last.nbytes
                else:
                    data, payload = self._encode(model, outputs, answer, plan)
                    nbytes = None
        except Exception as exc:
            metrics.requests.inc()
            metrics.errors.inc()
            log.warning("inference failed on %s %s: %s", model.name, model.version, exc)
            failure = RequestError(500, "inference_failed", f"{type(exc).__name__}: {exc}")
            metrics.request_latency.observe(time.perf_counter() - started)
            head = self.server.app.model_head(model)
            self._respond(failure.status, json.dumps(failure.as_dict()).encode(), head=head)
            return None
        self._latencies = (t1 - t0, time.perf_counter() - started)
        self.sent += 1
        try:  # (a client slow to read is not waited for before counting: before_waiting)
            self.conn.send(data, payload, nbytes, before_waiting=self._account)
        finally:
            self._account()
        return bound

    def _account(self) -> None:
        """Count the answer just sent, once it has left: off the client's path. A scrape
        waits for answers sent before it to be counted (InferenceServer.settle)."""
        if self.counted < self.sent:
            inference_s, request_s = self._latencies
            metrics = self.server.app.metrics
            metrics.requests.inc()
            metrics.inference_latency.observe(inference_s)
            metrics.request_latency.observe(request_s)
            self.counted = self.sent

    def _decode(
        self, model: ActiveModel, body: Body, key: tuple[str | None, ...] | None
    ) -> tuple[dict[str, np.ndarray], str, RawPlan | None]:
        """The feeds and the answer's form, every check made. A raw request's outcome is
        kept as the version's plan for ``key`` (its headers), and returned."""
        app = self.server.app
        fields = self._fields
        request_type = media_type(fields.get("content-type")) or JSON_TYPE
        runner = model.runner
        specs = runner.inputs
        if request_type in SINGLE_TENSOR_TYPES:
            arrays = decode_tensor(
                body,
                request_type,
                specs,
                name=fields.get(NAME_HEADER),
                dtype=fields.get(DTYPE_HEADER),
                shape=fields.get(SHAPE_HEADER),
            )
        elif request_type == NPZ_TYPE:
            settings = app.settings
            arrays = decode_npz(
                body,
                specs,
                max_members=settings.max_npz_members,
                max_bytes=settings.max_body_bytes * 4,
            )
        elif request_type == JSON_TYPE:
            arrays = decode_json(bytes(body), specs)
        else:
            raise RequestError(415, "unsupported_media_type", _UNSUPPORTED)
        feeds = validate(arrays, specs)
        answer = response_type(fields.get("accept"), request_type, len(runner.outputs))
        plan = None
        if key is not None and (plan := RawPlan.of(arrays, feeds, answer)) is not None:
            plans = model.raw_plans
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plans[key] = plan
        return feeds, answer, plan

    def _encode(
        self,
        model: ActiveModel,
        outputs: dict[str, np.ndarray],
        answer: str,
        plan: RawPlan | None,
    ) -> tuple[bytes, bytes | memoryview]:
        """The answer's head and payload; a raw answer's head is remembered by the plan
        of its request, for the next answer like it."""
        tensor_headers: dict[str, str] | None = None
        payload: bytes | memoryview
        if answer in SINGLE_TENSOR_TYPES and len(outputs) != 1:
            answer = NPZ_TYPE
        if answer == RAW_TYPE:
            ((name, array),) = outputs.items()
            payload, tensor_headers = encode_raw(name, array)
        elif answer == NPY_TYPE:
            ((name, array),) = outputs.items()
            payload = encode_npy(array)
            tensor_headers = {"X-Tensor-Name": name.encode().decode("latin-1")}
        elif answer == NPZ_TYPE:
            payload = encode_npz(outputs)
        else:
            payload = encode_json(outputs, model=model.name, version=model.version)
            answer = JSON_TYPE
        head_model = self.server.app.model_head(model)
        data = self._head(200, answer, len(payload), tensor_headers, head_model)
        if answer == RAW_TYPE and plan is not None and self._plain_head:
            plan.remember(outputs, data, payload)
        return data, payload

    @property
    def _plain_head(self) -> bool:
        """Whether this answer's head says nothing about the connection (the only heads
        a plan keeps and reuses)."""
        return not (self.close_connection or self._http10 or self.server.app.draining)

    def admin_swap(self) -> None:
        app = self.server.app
        if not app.admin_allowed(self.client_address[0], self.header("authorization")):
            self.close_connection = True
            self._error(
                RequestError(
                    403, "forbidden", "admin endpoints take loopback callers or the admin token"
                )
            )
            return
        try:
            body = self._read_body()
            request = SwapRequest.model_validate_json(bytes(body))
        except RequestError as exc:
            self._error(exc)
            return
        except ValidationError as exc:
            errors = json.loads(exc.json(include_url=False, include_input=False))
            self._json(422, {"error": "validation_error", "detail": errors})
            return
        current = app.current
        source = ModelSource(
            name=request.model_name or (current.name if current else app.settings.model_name),
            version=request.model_version,
            format=request.format,
            url=request.model_url,
            sha256=request.sha256.lower(),
        )
        try:
            model = app.swap(source)
        except SwapInProgress as exc:
            self._error(RequestError(409, "swap_in_progress", str(exc)))
        except ChecksumMismatch as exc:
            self._error(RequestError(422, "sha256_mismatch", str(exc)))
        except ArtifactUnavailable as exc:
            self._error(RequestError(502, "artifact_unavailable", str(exc)))
        except ModelLoadError as exc:
            self._error(RequestError(422, "model_load_failed", str(exc)))
        else:
            self._json(200, {"status": "active", **model.describe()})


_ROUTES: dict[str, dict[str, Callable[[_Handler], None]]] = {
    "/healthz": {"GET": _Handler.healthz},
    "/readyz": {"GET": _Handler.readyz},
    "/metrics": {"GET": _Handler.metrics},
    "/v1/model": {"GET": _Handler.model},
    "/v1/infer": {"POST": _Handler.infer},
    "/v1/admin/swap": {"POST": _Handler.admin_swap},
}
