"""Error translation and retries of the Kubernetes driver, against a real HTTP server on
loopback that answers like an overloaded API server (429 with Retry-After, then 200)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controller.kube.client import (
    Forbidden,
    KubernetesDriver,
    NotFound,
    ServerError,
    TooManyRequests,
    with_retries,
)


class Flaky(BaseHTTPRequestHandler):
    script: list[tuple[int, dict[str, str]]] = []
    seen: list[float] = []

    def do_GET(self) -> None:
        Flaky.seen.append(time.monotonic())
        status, headers = Flaky.script.pop(0) if Flaky.script else (200, {})
        body = json.dumps(
            {"items": []} if status == 200 else {"kind": "Status", "message": f"answer {status}"}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Flaky.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def driver(url: str, backoff: tuple[float, ...]) -> KubernetesDriver:
    return KubernetesDriver(
        "flaky",
        server=url,
        namespace="ns",
        credentials={"token": "t", "insecureSkipTLSVerify": True},
        image="img",
        port=1,
        timeout_s=5,
        backoff=backoff,
    )


def test_retry_after_is_honoured(server: str) -> None:
    Flaky.script = [(429, {"Retry-After": "1"}), (503, {}), (200, {})]
    d = driver(server, backoff=(0.05, 0.05, 0.05))
    assert d.list_nodes() == []
    gaps = [b - a for a, b in zip(Flaky.seen, Flaky.seen[1:], strict=False)]
    assert len(Flaky.seen) == 3
    assert gaps[0] >= 0.95  # the server asked for 1 s; the backoff step was 0.05 s
    assert gaps[1] < 0.5  # a 503 without Retry-After waits the backoff step only


def test_transient_errors_give_up_after_the_backoff_list(server: str) -> None:
    Flaky.script = [(500, {})] * 5
    with pytest.raises(ServerError, match="500 answer 500") as info:
        driver(server, backoff=(0.01, 0.01)).list_nodes()
    assert info.value.transient is True
    assert len(Flaky.seen) == 3  # first try + one per backoff step


@pytest.mark.parametrize(("status", "error"), [(403, Forbidden), (404, NotFound)])
def test_permanent_errors_are_not_retried(server: str, status: int, error: type[Exception]) -> None:
    Flaky.script = [(status, {})] * 3
    with pytest.raises(error):
        driver(server, backoff=(0.01, 0.01)).list_nodes()
    assert len(Flaky.seen) == 1


def test_with_retries_translates_connection_errors() -> None:
    calls = []

    def boom() -> None:
        calls.append(1)
        raise ConnectionRefusedError("refused")

    with pytest.raises(Exception, match="API server unreachable") as info:
        with_retries(boom, backoff=(0.01,), what="x")
    assert getattr(info.value, "transient", False) is True
    assert len(calls) == 2
    assert TooManyRequests("x").transient is True
