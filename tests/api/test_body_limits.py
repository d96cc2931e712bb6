"""Request bodies over their route's limit: refused with 413 in our error shape before
the handler reads past the limit, on a real server and a raw socket too."""

from __future__ import annotations

import asyncio
import json
import select
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, func
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from controller.api.app import create_app
from controller.db.models import ModelVersion
from controller.errors import PayloadTooLarge
from controller.settings import Settings
from controller.web.body_limits import (
    MULTIPART_ALLOWANCE,
    UPLOADS,
    LimitRequestBodies,
    body_limit,
    read_body,
)
from node_agent.contract import Heartbeat, InferenceMetrics, NodeStatus, WorkloadReport
from tests.conftest import bearer
from tests.live import live_controller

MiB = 1024 * 1024


def headers() -> dict[str, str]:
    """What every request here sends besides its body (the API's credentials)."""
    return bearer("admin")


@pytest.fixture
def small_artifacts(settings: Settings) -> Iterator[int]:
    """max_artifact_bytes of 1 MiB for this test: uploads are limited to 5 MiB."""
    old = settings.max_artifact_bytes
    settings.max_artifact_bytes = MiB
    try:
        yield MiB + MULTIPART_ALLOWANCE
    finally:
        settings.max_artifact_bytes = old


def stored_versions(session: Session) -> int:
    return session.scalar(sql_select(func.count()).select_from(ModelVersion)) or 0


def new_files(settings: Settings, before: set[Path]) -> set[Path]:
    root = settings.artifact_dir
    now = set(root.rglob("*")) if root.exists() else set()
    return {p for p in now - before if p.is_file()}


# --- which limit ---------------------------------------------------------------------


def test_every_upload_route_has_the_artifact_limit(settings: Settings) -> None:
    """The routes that take a file are the ones UPLOADS names, and only they."""
    doc = create_app(settings).openapi()
    uploads = {
        (method.upper(), path)
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        if "multipart/form-data" in operation.get("requestBody", {}).get("content", {})
    }
    assert uploads == {
        ("POST", "/v1/models/{name}/versions"),
        ("POST", "/v1/models/{name}/versions/{version}/variants"),
    }
    for method, path in uploads:
        concrete = path.replace("{name}", "detector").replace("{version}", "1.0.0")
        assert UPLOADS.fullmatch(concrete)
        limit, setting = body_limit(settings, method, concrete)
        assert limit == settings.max_artifact_bytes + MULTIPART_ALLOWANCE
        assert "EDGEFLEET_MAX_ARTIFACT_BYTES" in setting
    for path in {p for p in doc["paths"] if p.startswith("/v1/models/")}:
        concrete = path.replace("{name}", "detector").replace("{version}", "1.0.0")
        if ("POST", path) not in uploads:
            assert body_limit(settings, "POST", concrete)[0] == settings.max_request_bytes
    assert body_limit(settings, "POST", "/v1/apply") == (
        settings.max_manifest_bytes,
        "EDGEFLEET_MAX_MANIFEST_BYTES",
    )
    assert body_limit(settings, "GET", "/v1/models/detector/versions")[0] == (
        settings.max_request_bytes
    )


def test_a_full_heartbeat_batch_fits_the_default_limit(settings: Settings) -> None:
    """agent_max_batch heartbeats of 16 workloads each, every name 63 characters long:
    an agent's largest replay passes (an agent halves its batch on a 413 anyway)."""
    workload = WorkloadReport(
        model="m" * 63,
        version="1.2.3-rc.1+build.12345",
        sha256="a" * 64,
        state="Ready",
        metrics=InferenceMetrics(
            window_s=10.0,
            samples=123456,
            errors=12,
            p50_ms=1.2345,
            p95_ms=12.345,
            p99_ms=123.45,
            rate_per_s=1234.5,
        ),
    )
    beat = Heartbeat(
        cluster="c" * 63,
        node="n" * 63,
        seq=2**40,
        sent_at=datetime.now(UTC),
        status=NodeStatus(
            cpu_percent=99.5,
            memory_used_bytes=2**40,
            memory_total_bytes=2**40,
            disk_free_bytes=2**40,
            temperature_c=71.25,
            agent_version="0.1.0",
            cpu_model="x" * 200,
        ),
        workloads=[workload] * 16,
    )
    batch = "[" + ",".join([beat.model_dump_json(exclude_none=True)] * settings.agent_max_batch)
    limit, setting = body_limit(settings, "POST", "/v1/agents/heartbeat")
    assert setting == "EDGEFLEET_MAX_REQUEST_BYTES"
    assert len(batch) + 1 < limit, (len(batch), limit)


# --- the middleware, in-process ------------------------------------------------------


class Source:
    """An ASGI receive() of ``chunks`` body messages, counting those handed out."""

    def __init__(self, chunks: int, size: int) -> None:
        self.left, self.size, self.pulled = chunks, size, 0

    async def __call__(self) -> Message:
        if self.left == 0:
            return {"type": "http.disconnect"}
        self.left -= 1
        self.pulled += 1
        return {"type": "http.request", "body": b"x" * self.size, "more_body": self.left > 0}


def run(
    settings: Settings, source: Source, *, content_length: int | None = None
) -> tuple[list[Message], dict[str, Any]]:
    """POST /v1/apply through the middleware to a handler that reads the whole body
    and answers 200: what went out, and what the handler saw."""
    seen: dict[str, Any] = {"bytes": 0, "disconnected": False, "called": False}

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        seen["called"] = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["disconnected"] = True
                break
            seen["bytes"] += len(message["body"])
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"stored"})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    head = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/apply", "headers": head}
    asyncio.run(LimitRequestBodies(handler, settings)(scope, source, send))
    return sent, seen


def answer(sent: list[Message]) -> tuple[int, dict[str, str], Any]:
    start, body = sent
    assert start["type"] == "http.response.start"
    assert body["type"] == "http.response.body"
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, json.loads(body["body"])


def test_a_streamed_body_is_cut_off_at_the_limit(settings: Settings) -> None:
    limit = settings.max_manifest_bytes
    source = Source(chunks=100, size=limit // 10)  # ten times the limit, no Content-Length
    sent, seen = run(settings, source)
    status, head, body = answer(sent)  # the handler's 200 was dropped
    assert status == 413
    assert head["connection"] == "close"
    assert body == {
        "error": "payload_too_large",
        "detail": f"request body larger than the limit of {limit} bytes "
        "(EDGEFLEET_MAX_MANIFEST_BYTES)",
    }
    assert source.pulled == 11  # the chunk that passed the limit, and no more
    assert seen["bytes"] == limit // 10 * 10 <= limit  # the handler saw no more than it
    assert seen["disconnected"]


def test_a_declared_length_over_the_limit_is_413_before_reading(settings: Settings) -> None:
    source = Source(chunks=1, size=10)
    sent, seen = run(settings, source, content_length=settings.max_manifest_bytes + 1)
    assert answer(sent)[0] == 413
    assert source.pulled == 0
    assert not seen["called"]


def test_a_body_within_the_limit_passes_untouched(settings: Settings) -> None:
    size = settings.max_manifest_bytes // 4
    source = Source(chunks=4, size=size)
    sent, seen = run(settings, source, content_length=4 * size)
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"stored"
    assert seen == {"bytes": 4 * size, "disconnected": False, "called": True}


def test_read_body_stops_at_the_limit() -> None:
    source = Source(chunks=100, size=1000)
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, source)
    with pytest.raises(PayloadTooLarge, match=r"limit of 4500 bytes \(EDGEFLEET_X\)"):
        asyncio.run(read_body(request, limit=4500, setting="EDGEFLEET_X"))
    assert source.pulled == 5
    declared = Request(
        {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"9")]},
        Source(chunks=1, size=9),
    )
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(declared, limit=8, setting="EDGEFLEET_X"))


def test_an_upload_over_the_limit_is_413_and_stores_nothing(
    client: TestClient,
    session: Session,
    settings: Settings,
    artifact_files: set[Path],
    small_artifacts: int,
) -> None:
    resp = client.post(
        "/v1/models/detector/versions",
        data={"version": "1.0.0"},
        files={"file": ("m.onnx", b"\0" * (small_artifacts + 1), "application/octet-stream")},
    )
    assert resp.status_code == 413, resp.text
    assert resp.json() == {
        "error": "payload_too_large",
        "detail": f"request body larger than the limit of {small_artifacts} bytes "
        "(EDGEFLEET_MAX_ARTIFACT_BYTES, plus 4 MiB for the other form fields)",
    }
    assert stored_versions(session) == 0
    assert new_files(settings, artifact_files) == set()


# --- a real server, a raw socket -----------------------------------------------------

BOUNDARY = "edgefleet-bound"


def upload_head(*, content_length: int | None) -> bytes:
    framing = (
        f"Content-Length: {content_length}"
        if content_length is not None
        else "Transfer-Encoding: chunked"
    )
    lines = [
        "POST /v1/models/detector/versions HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        framing,
        *(f"{k}: {v}" for k, v in headers().items()),
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


def form_start() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1.0.0\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def stream(port: int, head: bytes, parts: Iterator[bytes], *, pause_s: float) -> tuple[Any, int]:
    """Send ``head``, then ``parts`` one by one, ``pause_s`` apart, until the server
    answers or hangs up. Returns the answer (status, headers, JSON body) and the body
    bytes sent before it came."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for part in parts:
            if select.select([sock], [], [], pause_s)[0]:
                break  # the answer is here
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(part)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    raw_headers, _, body = rest.partition(b"\r\n\r\n")
    head_map = dict(
        line.decode().lower().split(": ", 1) for line in raw_headers.split(b"\r\n") if line
    )
    return (int(status_line.split()[1]), head_map, json.loads(body)), sent


@pytest.fixture
def live_port(settings: Settings, connection: Connection) -> Iterator[int]:
    """The app under uvicorn; its sessions join the test's rolled-back transaction."""
    with live_controller(create_app(settings)) as live:
        yield live.port


def test_a_declared_upload_over_the_limit_is_refused_before_it_is_sent(
    live_port: int,
    session: Session,
    settings: Settings,
    artifact_files: set[Path],
    small_artifacts: int,
) -> None:
    declared = 512 * MiB
    first = form_start()

    def parts() -> Iterator[bytes]:
        yield first
        while True:
            yield b"\0" * (64 * 1024)

    (status, head, body), sent = stream(
        live_port, upload_head(content_length=declared), parts(), pause_s=0.05
    )
    assert status == 413, body
    assert body["error"] == "payload_too_large"
    assert f"limit of {small_artifacts} bytes (EDGEFLEET_MAX_ARTIFACT_BYTES" in body["detail"]
    assert head["connection"] == "close"
    assert sent <= len(first) + 64 * 1024  # answered on arrival: at most one part went out
    assert stored_versions(session) == 0
    assert new_files(settings, artifact_files) == set()


def test_a_chunked_upload_is_cut_off_at_the_limit(
    live_port: int,
    session: Session,
    settings: Settings,
    artifact_files: set[Path],
    small_artifacts: int,
) -> None:
    block = 256 * 1024
    intended = 256 * MiB

    def parts() -> Iterator[bytes]:
        first = form_start()
        yield b"%x\r\n%s\r\n" % (len(first), first)
        for _ in range(intended // block):
            yield b"%x\r\n%s\r\n" % (block, b"\0" * block)
        yield b"0\r\n\r\n"

    (status, head, body), sent = stream(
        live_port, upload_head(content_length=None), parts(), pause_s=0.005
    )
    assert status == 413, body
    assert head["connection"] == "close"
    assert f"limit of {small_artifacts} bytes" in body["detail"]
    # Cut off once the limit passed: what was in flight besides (socket buffers), not
    # the quarter GiB the client meant to send.
    assert small_artifacts < sent < small_artifacts + 32 * MiB, sent
    assert stored_versions(session) == 0
    assert new_files(settings, artifact_files) == set()
    staging = settings.artifact_dir / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_a_chunked_manifest_is_cut_off_at_the_limit(
    live_port: int, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The apply handler reads the body itself: it hears the client left, quietly."""
    old = settings.max_manifest_bytes
    settings.max_manifest_bytes = 64 * 1024
    head = "\r\n".join(
        [
            "POST /v1/apply HTTP/1.1",
            "Host: 127.0.0.1",
            "Content-Type: application/yaml",
            "Transfer-Encoding: chunked",
            *(f"{k}: {v}" for k, v in headers().items()),
            "",
            "",
        ]
    ).encode()
    line = b"# a comment line, forty-eight bytes long ......\n"
    block = line * 100
    try:
        (status, _, body), sent = stream(
            live_port,
            head,
            (b"%x\r\n%s\r\n" % (len(block), block) for _ in range(10_000)),
            pause_s=0.005,
        )
    finally:
        settings.max_manifest_bytes = old
    assert status == 413, body
    assert "limit of 65536 bytes (EDGEFLEET_MAX_MANIFEST_BYTES)" in body["detail"]
    assert 64 * 1024 < sent < 4 * 1024 * 1024
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
