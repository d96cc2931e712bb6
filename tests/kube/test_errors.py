"""Error translation and retries of the Kubernetes driver, against a real HTTP server on
loopback that answers like an overloaded API server (429 with Retry-After, then 200)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from controller.kube.client import (
    Forbidden,
    KubernetesDriver,
    NotFound,
    ServerError,
    TooManyRequests,
    with_retries,
)
from tests.http_fake import FakeHTTPServer, reply_json


class Flaky:
    """Answers from ``script`` (status, headers) in order, then 200; ``seen`` holds when
    each request came."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.seen: list[float] = []
        self.http = FakeHTTPServer(self.handle)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        self.seen.append(time.monotonic())
        status, headers = self.script.pop(0) if self.script else (200, {})
        body: dict[str, Any] = (
            {"items": []} if status == 200 else {"kind": "Status", "message": f"answer {status}"}
        )
        reply_json(h, status, body, headers=headers)


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    server = Flaky()
    yield server
    server.http.close()


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


def test_retry_after_is_honoured(flaky: Flaky) -> None:
    flaky.script = [(429, {"Retry-After": "1"}), (503, {}), (200, {})]
    d = driver(flaky.http.url, backoff=(0.05, 0.05, 0.05))
    assert d.list_nodes() == []
    gaps = [b - a for a, b in zip(flaky.seen, flaky.seen[1:], strict=False)]
    assert len(flaky.seen) == 3
    assert gaps[0] >= 0.95  # the server asked for 1 s; the backoff step was 0.05 s
    assert gaps[1] < 0.5  # a 503 without Retry-After waits the backoff step only


def test_transient_errors_give_up_after_the_backoff_list(flaky: Flaky) -> None:
    flaky.script = [(500, {})] * 5
    with pytest.raises(ServerError, match="500 answer 500") as info:
        driver(flaky.http.url, backoff=(0.01, 0.01)).list_nodes()
    assert info.value.transient is True
    assert len(flaky.seen) == 3  # first try + one per backoff step


@pytest.mark.parametrize(("status", "error"), [(403, Forbidden), (404, NotFound)])
def test_permanent_errors_are_not_retried(
    flaky: Flaky, status: int, error: type[Exception]
) -> None:
    flaky.script = [(status, {})] * 3
    with pytest.raises(error):
        driver(flaky.http.url, backoff=(0.01, 0.01)).list_nodes()
    assert len(flaky.seen) == 1


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
