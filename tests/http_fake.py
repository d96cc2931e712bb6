"""A threaded HTTP server on a free loopback port, for the stand-ins of a neighbour that
tests and benches talk to over real sockets (a controller, an inference server's
/metrics, an artifact origin, an overloaded API server): the stand-in says what to
answer, this owns the socket, the thread and the shutdown."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handle = Callable[[BaseHTTPRequestHandler], None]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops its connection is what some tests do on purpose; anything
        # else is a stand-in's bug and is printed as usual.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeHTTPServer:
    """Every request (any method: ``h.command`` tells them apart) goes to ``handle``,
    which answers through the handler it is given (``reply`` does the usual). Nothing is
    logged. ``keep_alive`` speaks HTTP/1.1, so a client's connection serves many requests;
    otherwise each answer closes it (HTTP/1.0)."""

    def __init__(self, handle: Handle, *, keep_alive: bool = False) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_GET(self) -> None:
                handle(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reply(
    h: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    *,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer ``status`` with ``body`` and a Content-Length (and ``headers``)."""
    h.send_response(status)
    if content_type is not None:
        h.send_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def reply_json(
    h: BaseHTTPRequestHandler,
    status: int,
    body: Any,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    reply(h, status, json.dumps(body).encode(), content_type="application/json", headers=headers)


def read_json(h: BaseHTTPRequestHandler) -> Any:
    """The request's JSON body (Content-Length framed)."""
    return json.loads(h.rfile.read(int(h.headers.get("Content-Length", "0"))))
