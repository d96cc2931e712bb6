"""The bytes on the wire: the npz fast path against numpy's own reader and writer, and
the server's HTTP/1.1 request parsing over raw sockets (keep-alive, pipelining, Expect,
malformed heads)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node_agent.runtimes import TensorSpec
from node_agent.server import npz
from node_agent.server.app import InferenceServer
from node_agent.server.tensors import RequestError, decode_npz, wants_npz
from tests.node_agent.test_serve_helpers import (
    Models,
    npz_bytes,
    running,
    settings_for,
)

ARRAYS = {
    "f32": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
    "scalar": np.array(3.5),
    "flags": np.array([True, False, True]),
    "bytes": np.arange(250, dtype=np.uint8),
    "half": np.arange(6, dtype=np.float16).reshape(2, 3),
    "empty": np.zeros((0, 4), dtype=np.int64),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    "strided": np.arange(20, dtype=np.float64)[::3],
    "ünïcode": np.ones(2, dtype=np.int8),
}


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- npz
def test_fast_reader_matches_np_load_on_what_savez_writes() -> None:
    body = npz_bytes(**ARRAYS)
    got = npz.read(body, max_members=64)
    assert got is not None, "np.savez output must take the fast path"
    assert list(got) == list(ARRAYS)
    for name, array in ARRAYS.items():
        same(got[name], array)
        assert got[name].flags.aligned


def test_writer_output_is_read_by_np_load() -> None:
    body = npz.write(ARRAYS)
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        for name, array in ARRAYS.items():
            same(archive[name], array)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None  # every CRC right
    fast = npz.read(body, max_members=64)
    assert fast is not None
    for name, array in ARRAYS.items():
        same(fast[name], array)


def test_writer_refuses_objects() -> None:
    with pytest.raises(ValueError, match="object"):
        npz.write({"o": np.array([{"a": 1}], dtype=object)})


def test_other_archives_fall_back_to_np_load() -> None:
    spec = [TensorSpec("x", "float32", (None, 4))]
    x = np.ones((2, 4), np.float32)
    compressed = io.BytesIO()
    np.savez_compressed(compressed, x=x)
    assert npz.read(compressed.getvalue(), max_members=8) is None  # deflated: not ours
    same(decode_npz(compressed.getvalue(), spec, max_members=8, max_bytes=1 << 20)["x"], x)
    commented = io.BytesIO()
    with zipfile.ZipFile(commented, "w") as archive:
        archive.comment = b"made by hand"
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array(member, x)
    assert npz.read(commented.getvalue(), max_members=8) is None
    same(decode_npz(commented.getvalue(), spec, max_members=8, max_bytes=1 << 20)["x"], x)


def test_damaged_archives_are_400() -> None:
    spec = [TensorSpec("x", "float32", (2,))]
    body = bytearray(npz_bytes(x=np.array([1.0, 2.0], np.float32)))
    body[body.index(b"PK\x01\x02") + 16] ^= 0xFF  # the CRC-32 of the central directory entry
    flipped = bytes(npz_bytes(x=np.array([1.0, 2.0], np.float32)))
    data_at = flipped.index(b"\x00\x00\x80?")  # 1.0f
    corrupt = flipped[:data_at] + b"\x00\x00\x80\xbf" + flipped[data_at + 4 :]
    with pytest.raises(RequestError) as exc:
        decode_npz(corrupt, spec, max_members=8, max_bytes=1 << 20)
    assert exc.value.status == 400
    assert "CRC" in exc.value.message
    for junk in (bytes(body), b"", b"PK", bytes(body[:50]), b"\x93NUMPY" + bytes(100)):
        with pytest.raises(RequestError) as exc:
            decode_npz(junk, spec, max_members=8, max_bytes=1 << 20)
        assert exc.value.status == 400


def test_zip_bomb_is_413_before_decompressing() -> None:
    spec = [TensorSpec("x", "float32", (None,))]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros(4_000_000, np.float32))  # 16 MB of zeros
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(RequestError) as exc:
        decode_npz(buffer.getvalue(), spec, max_members=8, max_bytes=1_000_000)
    assert exc.value.status == 413


def test_too_many_members() -> None:
    spec = [TensorSpec("x", "float32", (1,))]
    body = npz_bytes(**{f"a{i}": np.zeros(1, np.float32) for i in range(10)})
    with pytest.raises(RequestError, match="more than 4 arrays"):
        decode_npz(body, spec, max_members=4, max_bytes=1 << 20)


def test_response_form_negotiation() -> None:
    assert wants_npz(None, "application/x-npz")
    assert not wants_npz(None, "application/json")
    assert wants_npz("application/x-npz", "application/json")
    assert not wants_npz("application/json", "application/x-npz")
    assert wants_npz("*/*", "application/x-npz")
    assert not wants_npz("text/html, */*;q=0.8", "application/json")


# ---------------------------------------------------------------------- HTTP
@pytest.fixture
def server(models: Models, tmp_path: Path) -> Iterator[InferenceServer]:
    with running(settings_for(tmp_path, models.cnn, max_body_bytes=100_000)) as s:
        yield s


_pending: dict[int, bytes] = {}  # bytes read past a response, per socket (pipelining)


def connect(server: InferenceServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    _pending.pop(sock.fileno(), None)  # a reused descriptor number starts clean
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = _pending.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    _pending[sock.fileno()] = rest[length:]
    return status, headers, rest[:length]


def closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_and_pipelined_requests(server: InferenceServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert read_response(sock)[0] == 200
        status, headers, body = read_response(sock)
        assert status == 200
        assert b'"ready"' in body
        assert "connection" not in headers  # still open
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert (status, headers["connection"]) == (200, "close")
        assert closed(sock)


def test_http_1_0_closes_unless_keep_alive(server: InferenceServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert closed(sock)
    with connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert (status, headers["connection"]) == (200, "keep-alive")  # said back


INNER = b"GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(INNER), 404),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(INNER), 200),
        (b"PUT /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(INNER), 405),
        (b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ],
)
def test_a_body_nobody_reads_is_never_a_request(
    server: InferenceServer, head: bytes, status: int
) -> None:
    """A route that does not read the body answers and closes: the body's bytes are not
    parsed as the next request (no smuggling past a proxy)."""
    with connect(server) as sock:
        sock.sendall(head + INNER)
        got, headers, _ = read_response(sock)
        assert (got, headers["connection"]) == (status, "close")
        assert closed(sock)


def test_expect_100_only_where_the_body_is_wanted(server: InferenceServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"POST /nowhere HTTP/1.1\r\nHost: x\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        status, headers, _ = read_response(sock)  # no 100 Continue before it
        assert (status, headers["connection"]) == (404, "close")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.2\r\n\r\n", 505),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded: line\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-Many: y\r\n" * 101 + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"y" * 70000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_heads_are_refused(server: InferenceServer, head: bytes, status: int) -> None:
    with connect(server) as sock:
        sock.sendall(head)
        got, headers, body = read_response(sock)
        assert got == status
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]
        assert closed(sock)


def test_post_without_length_or_chunked_is_411(server: InferenceServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
        )
        status, _, body = read_response(sock)
        assert status == 411
        assert b"Content-Length" in body
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert read_response(sock)[0] == 411
        assert closed(sock)


@pytest.mark.parametrize(
    "length",
    [b"2\r\nContent-Length: 40", b"+2", b"0_2", b" 2 2", b"-2", b"0x2", b"\xd9\xa2"],
)
def test_content_lengths_other_than_digits_are_400(server: InferenceServer, length: bytes) -> None:
    """Conflicting or lax forms (int() would take "+2" and "0_2") frame nothing: 400, and
    the connection closes, so no byte of the body is read as a request."""
    with connect(server) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}" % length)
        assert read_response(sock)[0] == 400
        assert closed(sock)


def test_expect_100_continue(server: InferenceServer) -> None:
    body = npz_bytes(image=np.zeros((1, 3, 32, 32), np.float32))
    head = (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npz\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        status, headers, _ = read_response(sock)
        assert (status, headers["content-type"]) == (200, "application/x-npz")
    with connect(server) as sock:
        sock.sendall(head % 10_000_000)  # over the limit: refused before the body is sent
        status, _, payload = read_response(sock)
        assert status == 413
        assert b"100000-byte limit" in payload
        assert closed(sock)


def test_agent_extra_imports_only(tmp_path: Path) -> None:
    """Edge nodes install the `agent` extra: the server must not import the control
    plane's stack (SQLAlchemy, Celery, FastAPI) or anything under controller/."""
    code = (
        "import sys, node_agent.serve, node_agent.server.app, node_agent.cache\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'sqlalchemy', 'celery', 'fastapi', 'starlette', 'uvicorn', 'controller', 'onnx'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == ""
