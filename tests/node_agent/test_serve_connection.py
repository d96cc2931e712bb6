"""The inference server's connection layer (``node_agent.server.connection``) on real
sockets, and the raw-tensor hot path it feeds: heads split across reads, bodies read in
place and aligned, buffers that grow and shrink back, the idle timeout, partial sends,
busy polling, and answers reused only while they are still right."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from node_agent import contract
from node_agent.server import tensors
from node_agent.server.app import InferenceServer
from node_agent.server.connection import (
    INITIAL_BUFFER,
    KEEP_BUFFER,
    MAX_HEAD,
    Connection,
    HttpError,
    Request,
)
from node_agent.server.metrics import BUSY_POLL_HITS, BUSY_POLL_SECONDS, CONNECTIONS_REFUSED
from node_agent.server.tensors import RAW_TYPE as RAW
from node_agent.server.tensors import RawAnswer, RawPlan
from tests.node_agent.test_serve import scrape, value
from tests.node_agent.test_serve_helpers import (
    Models,
    Origin,
    ort_run,
    running,
    settings_for,
    sha256,
    wait_for,
)
from tests.node_agent.test_serve_wire import closed, connect, read_response

HEAD = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A server-side Connection and the client's end of a loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    server, _ = listener.accept()
    listener.close()
    with server, client:
        # A window over the GIL's switch interval (5 ms): a polling thread lets the
        # client's thread run (in-process here) only at a forced switch.
        yield Connection(server, idle_timeout_s=5, busy_poll_s=0.05), client


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).ctypes.data)


def test_a_head_trickling_in_byte_by_byte(pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    head = b"GET /readyz?x=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n"

    def trickle() -> None:
        for i in range(len(head)):
            client.sendall(head[i : i + 1])
            time.sleep(0.001)

    writer = threading.Thread(target=trickle)
    writer.start()
    request = conn.next_request()
    writer.join()
    assert request == Request("GET", "/readyz?x=1", "HTTP/1.1", {"host": "x", "x-a": "1, 2"}, True)


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.0\nConnection: keep-alive\n\n",  # bare LF
        b"GET / HTTP/1.0\nConnection: keep-alive\r\n\r\n",  # mixed
        b"GET / HTTP/1.0\r\nConnection: keep-alive\n\n",
    ],
)
def test_bare_lf_heads(pair: tuple[Connection, socket.socket], head: bytes) -> None:
    conn, client = pair
    client.sendall(head + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    request = conn.next_request()
    assert request is not None
    assert (request.target, request.headers, request.keep_alive) == (
        "/",
        {"connection": "keep-alive"},
        True,
    )
    following = conn.next_request()
    assert following is not None
    assert following.target == "/next"


def test_framing_edge_cases(pair: tuple[Connection, socket.socket]) -> None:
    """A bare-LF blank line before a body that starts with CRLF; empty lines before a
    request line (ignored, RFC 9112 2.2)."""
    conn, client = pair
    client.sendall(
        b"POST /a HTTP/1.1\nHost: x\nContent-Length: 4\n\n\r\nab\r\n"
        b"\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    first = conn.next_request()
    assert first is not None
    assert (first.target, first.headers) == ("/a", {"host": "x", "content-length": "4"})
    assert bytes(conn.read_body(4)) == b"\r\nab"
    second = conn.next_request()
    assert second is not None
    assert second.target == "/b"


def test_a_long_head_arriving_at_once_is_431(pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    conn._new_buffer(MAX_HEAD * 4)  # (as a large body earlier on this connection leaves it)
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 4000) for i in range(90))
    client.sendall(b"GET / HTTP/1.1\r\n" + lines + b"\r\n")
    with pytest.raises(HttpError) as refused:
        conn.next_request()
    assert refused.value.status == 431


def test_a_head_alone_commits_no_body_buffer(pair: tuple[Connection, socket.socket]) -> None:
    """The buffer grows as body bytes arrive, not to what Content-Length announces."""
    conn, client = pair
    client.sendall(HEAD % (64 << 20) + b"x" * 1000)
    client.shutdown(socket.SHUT_WR)
    assert conn.next_request() is not None
    with pytest.raises(ConnectionError):
        conn.read_body(64 << 20)
    assert len(conn._buffer) <= 2 * INITIAL_BUFFER


def test_pipelined_requests_in_random_pieces() -> None:
    """Bodies of every size around the alignment and buffer limits, pipelined and cut
    into random pieces: every one arrives whole, in order."""
    rng = random.Random(7)
    sizes = [0, 1, 63, 64, 65, 4096, INITIAL_BUFFER - 1, INITIAL_BUFFER + 1, 300_000]
    sizes += [KEEP_BUFFER + 3]
    bodies = [rng.randbytes(rng.choice(sizes)) for _ in range(60)]
    stream = b"".join(
        b"POST /%d HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s"
        % (i, b"X-Pad: %s\r\n" % (b"p" * rng.randrange(40)) if i % 3 else b"", len(b), b)
        for i, b in enumerate(bodies)
    )
    listener = socket.create_server(("127.0.0.1", 0))
    with socket.create_connection(listener.getsockname()) as client:
        server, _ = listener.accept()
        listener.close()

        def send() -> None:
            at = 0
            while at < len(stream):
                step = rng.choice([1, 7, 100, 5000, 70_000, 1 << 20])
                client.sendall(stream[at : at + step])
                at += step
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        with server:
            conn = Connection(server, idle_timeout_s=10)
            for i, body in enumerate(bodies):
                request = conn.next_request()
                assert request is not None
                assert request.target == f"/{i}"
                view = conn.read_body(len(body))
                assert bytes(view) == body
            assert conn.next_request() is None
        sender.join()


def test_bodies_land_aligned_in_place(pair: tuple[Connection, socket.socket]) -> None:
    """Whatever the head's length, a body is handed out 64-byte aligned; a repeated head
    is the same request object, parsed once."""
    conn, client = pair
    seen = []
    for size, pad in [(100_000, ""), (100_000, ""), (70, "X-Pad: 1\r\n"), (300_000, "")]:
        body = np.random.default_rng(size).integers(0, 255, size, np.uint8).tobytes()
        head = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n" % (
            pad.encode(),
            size,
        )
        client.sendall(head + body)
        request = conn.next_request()
        assert request is not None
        assert request.headers["content-length"] == str(size)
        view = conn.read_body(size)
        assert bytes(view) == body
        assert address(view) % 64 == 0
        seen.append(request)
    assert seen[0] is seen[1]  # the same bytes: not parsed again
    assert seen[2] is not seen[1]


def test_buffers_grow_for_a_body_and_shrink_back(pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    big = KEEP_BUFFER + 1_000_000
    sender = threading.Thread(target=client.sendall, args=(HEAD % big + b"b" * big,))
    sender.start()
    assert conn.next_request() is not None
    assert bytes(conn.read_body(big)) == b"b" * big
    sender.join()
    conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.sendall(HEAD % 5 + b"small")
    assert conn.next_request() is not None
    assert bytes(conn.read_body(5)) == b"small"
    assert len(conn._buffer) < KEEP_BUFFER  # the big buffer was not kept


def test_a_client_that_closes_mid_body(pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    client.sendall(HEAD % 1000 + b"only part")
    client.shutdown(socket.SHUT_WR)
    assert conn.next_request() is not None
    with pytest.raises(ConnectionError):
        conn.read_body(1000)
    assert conn.next_request() is None  # and nothing after it


def test_idle_connections_time_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with socket.create_connection(listener.getsockname()) as client:
        server, _ = listener.accept()
        listener.close()
        with server:
            conn = Connection(server, idle_timeout_s=0.2)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                conn.next_request()
            assert 0.15 < time.monotonic() - started < 3
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # (too late: the caller closes)


def test_a_large_answer_leaves_whole_through_a_small_send_buffer(
    pair: tuple[Connection, socket.socket],
) -> None:
    conn, client = pair
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = np.arange(2_000_000, dtype=np.float32)  # 8 MB, sent from the array itself
    received = bytearray()

    def drain() -> None:
        while len(received) < 10 + payload.nbytes:
            chunk = client.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    slow: list[bool] = []
    conn.send(b"head: x\r\n\r", payload.data, before_waiting=lambda: slow.append(True))
    reader.join(30)
    assert bytes(received) == b"head: x\r\n\r" + payload.tobytes()
    assert slow == [True]  # told once that the client could not take it all at once


def test_busy_polling_follows_the_client(pair: tuple[Connection, socket.socket]) -> None:
    """A client that comes back within the window is caught by polling; once one is
    slower, polling stops until a quick return shows it is worth it again."""
    conn, client = pair
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    client.sendall(request)
    assert conn.next_request() is not None  # the first request is never polled for

    def answer_then_ask(delay_s: float) -> bool:
        """Answer, let the client ask again after ``delay_s``; whether it was polled."""
        conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        asker = threading.Timer(delay_s, client.sendall, args=(request,))
        asker.start()
        hits = conn.poll_hits
        assert conn.next_request(poll=True) is not None
        asker.join()
        return conn.poll_hits > hits

    assert answer_then_ask(0)
    assert not answer_then_ask(0.3)  # over the 50 ms window: polled it once, then slept
    assert 0.045 < conn.polled_s < 0.3
    spent = conn.polled_s
    assert not answer_then_ask(0)  # not polled: the last client was slow
    assert conn.polled_s == spent
    assert answer_then_ask(0)  # but that one came back quickly: polling resumes


def test_raw_answer_reuse_needs_the_same_output() -> None:
    out = np.zeros((1, 10), np.float32)
    last = RawAnswer("probabilities", out.dtype, out.shape, out.nbytes, b"head")
    assert last.matches({"probabilities": np.ones((1, 10), np.float32)}) is not None
    assert last.matches({"probabilities": np.ones((2, 10), np.float32)}) is None
    assert last.matches({"probabilities": np.ones((1, 10), np.float64)}) is None
    assert last.matches({"logits": np.ones((1, 10), np.float32)}) is None
    two = {"probabilities": np.ones((1, 10), np.float32), "x": np.ones(1, np.float32)}
    assert last.matches(two) is None
    strided = np.ones((1, 20), np.float32)[:, ::2]
    assert last.matches({"probabilities": strided}) is None


def test_no_plans_on_a_big_endian_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw bodies are little-endian: a big-endian host swaps every one, so a plan (which
    skips decoding) would feed unswapped bytes."""
    x = np.zeros((1, 4), np.float32)
    assert RawPlan.of({"x": x}, {"x": x}, RAW) is not None
    monkeypatch.setattr(tensors, "_LITTLE_ENDIAN", False)
    assert RawPlan.of({"x": x}, {"x": x}, RAW) is None


# ---------------------------------------------------------------------- the server
def raw_request(x: np.ndarray, extra: str = "") -> bytes:
    return (
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"X-Tensor-Dtype: {x.dtype.name}\r\nX-Tensor-Shape: {','.join(map(str, x.shape))}\r\n"
        f"{extra}Content-Length: {x.nbytes}\r\n\r\n"
    ).encode() + x.tobytes()


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)


def test_repeated_raw_requests_are_answered_right(
    cnn_server: InferenceServer, models: Models
) -> None:
    """The hot path (plan and answer head reused) gives every request its own output;
    a closing request still says so; a scrape on another connection right after an
    answer always counts it."""
    with connect(cnn_server) as sock, httpx.Client(base_url=cnn_server.url) as scraper:
        for i in range(6):
            x = image(i)
            sock.sendall(raw_request(x))
            status, headers, body = read_response(sock)
            assert status == 200, body
            assert (headers["x-model-version"], headers["x-tensor-shape"]) == ("1", "1,10")
            want = ort_run(models.cnn, {"image": x})["probabilities"]
            got = np.frombuffer(body, np.float32).reshape(1, 10)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
            assert value(scrape(scraper), contract.REQUESTS_TOTAL) == i + 1
        sock.sendall(raw_request(image(9), "Connection: close\r\n"))
        status, headers, _ = read_response(sock)
        assert (status, headers["connection"]) == (200, "close")
        assert closed(sock)


def test_a_plan_is_not_a_shortcut_past_validation(cnn_server: InferenceServer) -> None:
    with connect(cnn_server) as sock:
        for _ in range(2):
            sock.sendall(raw_request(image(0)))
            assert read_response(sock)[0] == 200
        # The same headers over a body of another length: checked in full.
        short = raw_request(image(0)).replace(b"Content-Length: 12288", b"Content-Length: 12284")
        sock.sendall(short[:-4])
        status, _, body = read_response(sock)
        assert status == 400
        assert b"needs 12288" in body


def test_a_swap_drops_what_the_old_version_learned(models: Models, tmp_path: Path) -> None:
    """Plans and answer heads belong to a version: after a swap the same raw request is
    checked against the new signature, and answered with the new version's headers."""
    with (
        Origin() as origin,
        running(settings_for(tmp_path, models.cnn)) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
        connect(server) as sock,
    ):

        def swap(model: str, version: str) -> None:
            blob = models.bytes(model)
            request = {
                "model_url": origin.add(f"{model}-{version}", blob),
                "sha256": sha256(blob),
                "model_version": version,
            }
            assert c.post("/v1/admin/swap", json=request).status_code == 200

        for _ in range(2):
            sock.sendall(raw_request(image(0)))
            assert read_response(sock)[1]["x-model-version"] == "1"
        swap("cnn", "1b")  # the same bytes, relabelled
        sock.sendall(raw_request(image(0)))
        assert read_response(sock)[1]["x-model-version"] == "1b"
        swap("scorer", "2")  # another signature: two inputs, named dims
        sock.sendall(raw_request(image(0)))
        status, _, body = read_response(sock)
        assert status == 422, body


@pytest.mark.parametrize("busy_poll_us", [0, 20_000])  # (over the GIL switch interval)
def test_busy_polling_is_counted(models: Models, tmp_path: Path, busy_poll_us: int) -> None:
    with (
        running(settings_for(tmp_path, models.cnn, busy_poll_us=busy_poll_us)) as server,
        connect(server) as sock,
        httpx.Client(base_url=server.url) as scraper,
    ):
        for i in range(20):
            sock.sendall(raw_request(image(i)))
            assert read_response(sock)[0] == 200
        samples = scrape(scraper)
        hits, seconds = value(samples, BUSY_POLL_HITS), value(samples, BUSY_POLL_SECONDS)
        if busy_poll_us:
            assert 10 <= hits <= 19  # the first request is never polled for
            assert 0 < seconds < 19 * busy_poll_us / 1e6
        else:
            assert (hits, seconds) == (0, 0)


def test_connections_over_the_limit_are_503(models: Models, tmp_path: Path) -> None:
    with running(settings_for(tmp_path, models.cnn, max_connections=2)) as server:
        first, second = connect(server), connect(server)
        for sock in (first, second):  # both served, both kept open
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
        with connect(server) as third:
            status, headers, body = read_response(third)
            assert (status, headers["retry-after"]) == (503, "1")
            assert b"too_many_connections" in body
            assert closed(third)
        first.close()

        def healthy() -> bool:
            with connect(server) as again:
                again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                return read_response(again)[0] == 200

        # The slot comes back once the server has seen the close.
        assert wait_for(healthy, every_s=0.05)
        with httpx.Client(base_url=server.url) as c:
            assert value(scrape(c), CONNECTIONS_REFUSED) >= 1
        second.close()
