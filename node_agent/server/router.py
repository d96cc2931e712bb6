"""A connection's requests, in order, each routed to its endpoint and answered.

:class:`Router` is the handler the listener runs for each connection, on its thread: it
takes requests off the :class:`~node_agent.server.connection.Connection`, looks their
endpoint up in ``routes`` (:class:`node_agent.server.endpoints.Handler`'s) and has what
every endpoint answers with: JSON, errors in the API's one shape, the body read in place
(``Expect: 100-continue`` included). Of the server it sees only :class:`App`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import socketserver
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, ClassVar, Protocol, Self
from urllib.parse import urlsplit

from node_agent.server.connection import PHRASES, Connection, HttpError, Listener, Request
from node_agent.server.metrics import ServerMetrics
from node_agent.server.model import ActiveModel, ModelSource
from node_agent.server.settings import ServeSettings
from node_agent.server.tensors import JSON_TYPE, RequestError

log = logging.getLogger("node_agent.serve")

_CTL = re.compile(r"[\x00-\x1f\x7f]")


class App(Protocol):
    """What a connection uses of the server it belongs to (``InferenceServer``)."""

    settings: ServeSettings
    metrics: ServerMetrics
    handlers: set[Router]  # open connections

    @property
    def state(self) -> str: ...
    @property
    def current(self) -> ActiveModel | None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def idle(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    def begin_request(self) -> None: ...
    def end_request(self) -> None: ...
    def settle(self, timeout_s: float = 0.1) -> None: ...
    def admin_allowed(self, client: str, authorization: str | None) -> bool: ...
    def swap(self, source: ModelSource) -> ActiveModel: ...


def header_lines(headers: dict[str, str]) -> str:
    """Header lines, each ending in CRLF. Values such as a model version come from
    configuration: never let one break the header block (control characters)."""
    return "".join(
        f"{k}: {v if v.isprintable() else _CTL.sub(' ', v)}\r\n"
        for k, v in ((k, str(v)) for k, v in headers.items())
    )


class Router(socketserver.BaseRequestHandler):
    """One connection: its requests in order (see :mod:`node_agent.server.connection`).
    ``routes``: path, then method, to endpoint (the subclass's)."""

    routes: ClassVar[dict[str, dict[str, Callable[[Self], None]]]]
    server: Listener[App]
    request: socket.socket
    conn: Connection
    command = ""  # the current request's method, target and headers
    path = ""
    _fields: dict[str, str]
    close_connection = True
    _http10 = False  # an HTTP/1.0 request (keep-alive only when it asks, and said back)
    _unread = False  # the request has a body the handler has not read
    sent = counted = 0  # inference answers sent / counted in the metrics (FastPath)
    _request: Request  # the current request

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
        try:
            self._dispatch(method)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except HttpError as exc:  # (a body over its deadline)
            self._refuse(exc.status, exc.message, "body")
        except Exception:
            log.exception("unhandled error on %s %s", method, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._error(RequestError(500, "internal_error", "internal server error"))

    def _dispatch(self, method: str) -> None:
        """Run the request's endpoint (the fast path goes around this: FastPath)."""
        if (handler := self._lookup(method)) is not None:
            handler(self)

    def _lookup(self, method: str) -> Callable[[Self], None] | None:
        """The endpoint for this request, or ``None`` once it is answered 404 or 405."""
        path = self.path
        routes = self.routes.get(path)  # origin-form without a query: no parsing needed
        if routes is None:
            path = urlsplit(path).path
            routes = self.routes.get(path)
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
        """One response; ``head`` is header lines already formatted (``header_lines``)."""
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
            text += header_lines(headers)
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
