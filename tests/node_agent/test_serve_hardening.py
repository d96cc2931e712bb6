"""``edgefleet-serve`` against slow and malformed clients: a deadline for a request's head
and for its body (408 and close), a cap on one client address's connections (503) that
keeps ``/healthz`` answering while a slow client holds all it may, and the head parser
held to h11's rules by a differential test over a table of heads."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest

from node_agent.server.app import InferenceServer
from node_agent.server.connection import Connection, HttpError
from node_agent.server.metrics import (
    CLIENT_CONNECTIONS_REFUSED,
    CONNECTIONS_REFUSED,
    REQUEST_TIMEOUTS,
)
from node_agent.server.settings import ServeSettings
from tests.node_agent.test_serve import scrape, value
from tests.node_agent.test_serve_helpers import running, settings_for, wait_for

SLOW_CLIENT = "127.0.0.2"  # (all of 127/8 is loopback: another client address, same host)


def serve_settings(tmp_path: Path, **overrides: float) -> ServeSettings:
    """A server that never loads its model: /healthz answers, /v1/infer reads its body
    and answers 503, which is all these tests need."""
    return settings_for(tmp_path, tmp_path / "absent.onnx", **overrides)


def connect_from(server: InferenceServer, source: str) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", server.port), timeout=10, source_address=(source, 0)
    )


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The one response the server sends before it closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # (bytes sent after it went unread: the answer came first)
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def healthz(server: InferenceServer) -> int:
    with connect_from(server, "127.0.0.1") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return answer(sock)[0]


def trickle_until_answered(
    socks: list[socket.socket], byte: bytes, limit_s: float
) -> dict[socket.socket, float]:
    """Send ``byte`` on each socket every 50 ms, never idle long enough for the idle
    timeout, until the server answers each (or ``limit_s`` passes): when each answered."""
    began = time.monotonic()
    answered: dict[socket.socket, float] = {}
    while len(answered) < len(socks) and time.monotonic() - began < limit_s:
        waiting = [s for s in socks if s not in answered]
        readable, _, _ = select.select(waiting, [], [], 0.05)
        for sock in readable:
            answered[sock] = time.monotonic()
        for sock in waiting:
            if sock not in answered:
                try:
                    sock.sendall(byte)
                except OSError:  # (closed just now: its answer is readable)
                    answered.setdefault(sock, time.monotonic())
    return answered


# ---------------------------------------------------------------------- slow clients
def test_slow_heads_take_one_clients_share_and_get_408(tmp_path: Path) -> None:
    """Four connections trickling a head one byte at a time from one address: a fifth
    from there is 503 (its cap), /healthz from another address is 200 while they are
    held (the global cap is far), and each gets 408 and a close at the head deadline,
    long before the idle timeout. Their slots come back after."""
    settings = serve_settings(
        tmp_path,
        max_connections=16,
        max_connections_per_client=4,
        head_timeout_s=2.0,
        idle_timeout_s=30.0,
    )
    with running(settings, load=False) as server:
        began = time.monotonic()
        slow = [connect_from(server, SLOW_CLIENT) for _ in range(4)]
        try:
            for sock in slow:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            with connect_from(server, SLOW_CLIENT) as fifth:
                status, headers, body = answer(fifth)
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert b"too_many_connections" in body
            assert healthz(server) == 200
            held, _, _ = select.select(slow, [], [], 0)
            assert held == []  # all four still waiting for their heads, not answered yet

            answered = trickle_until_answered(slow, b"a", limit_s=20)
            assert len(answered) == 4
            for sock in slow:
                status, headers, body = answer(sock)
                assert (status, headers["connection"]) == (408, "close")
                assert b"request_timeout" in body
                # Not before the deadline (the server's clock started after ``began``),
                # and by it rather than by the idle timeout (30 s).
                assert 2.0 - 0.05 <= answered[sock] - began < 15
        finally:
            for sock in slow:
                sock.close()

        def healthy() -> bool:
            with connect_from(server, SLOW_CLIENT) as again:
                again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return answer(again)[0] == 200

        # Their slots come back once the server has seen them close.
        assert wait_for(healthy, every_s=0.05)
        with httpx.Client(base_url=server.url) as c:
            samples = scrape(c)
        assert value(samples, CLIENT_CONNECTIONS_REFUSED) >= 1
        assert value(samples, CONNECTIONS_REFUSED) == 0
        assert value(samples, REQUEST_TIMEOUTS, phase="head") == 4


def test_a_slow_body_gets_408(tmp_path: Path) -> None:
    settings = serve_settings(
        tmp_path, body_timeout_s=1.0, body_min_bytes_per_s=1_000_000, idle_timeout_s=30.0
    )
    with running(settings, load=False) as server, connect_from(server, "127.0.0.1") as sock:
        began = time.monotonic()
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}")
        answered = trickle_until_answered([sock], b" ", limit_s=20)
        status, headers, body = answer(sock)
        assert (status, headers["connection"]) == (408, "close")
        assert b"1000-byte request body" in body
        assert 1.0 <= answered[sock] - began < 15  # (1 s + 1000 B at 1 MB/s)
        with httpx.Client(base_url=server.url) as c:
            assert value(scrape(c), REQUEST_TIMEOUTS, phase="body") == 1


def test_connections_per_client_leave_other_clients_alone(tmp_path: Path) -> None:
    """The cap counts one address's open connections; another address, and the same one
    once a connection closes, are served."""
    settings = serve_settings(tmp_path, max_connections=8, max_connections_per_client=2)
    with running(settings, load=False) as server:
        held = [connect_from(server, SLOW_CLIENT) for _ in range(2)]
        try:
            for sock in held:  # served, and kept open
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(12) == b"HTTP/1.1 200"
            with connect_from(server, SLOW_CLIENT) as third:
                status, _, body = answer(third)
            assert status == 503
            assert b"from this address" in body
            assert healthz(server) == 200
        finally:
            for sock in held:
                sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The server's and the client's ends of a loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    server, _ = listener.accept()
    listener.close()
    with server, client:
        yield server, client


def test_the_head_clock_starts_at_its_first_byte(pair: tuple[socket.socket, socket.socket]) -> None:
    """Idle time before a head is the idle timeout's; a head split in pieces within its
    deadline is served, and the idle timeout is back after it; a head begun and left
    unfinished is 408 at its deadline, not at the idle timeout."""
    server, client = pair
    conn = Connection(server, idle_timeout_s=5, head_timeout_s=0.3)
    time.sleep(0.5)  # idle, over the head deadline
    client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (request := conn.next_request()) is not None
    assert request.target == "/a"
    client.sendall(b"GET /b HTTP/1.1\r\nHost: ")
    threading.Timer(0.1, client.sendall, args=(b"x\r\n\r\n",)).start()
    assert (request := conn.next_request()) is not None
    assert request.target == "/b"
    time.sleep(0.5)  # idle again: a receive waits the idle timeout again, not 0.3 s
    client.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (request := conn.next_request()) is not None
    assert request.target == "/c"
    client.sendall(b"GET /d HTTP/1.1\r\n")  # and nothing more
    began = time.monotonic()
    with pytest.raises(HttpError) as late:
        conn.next_request()
    assert late.value.status == 408
    assert 0.25 <= time.monotonic() - began < 3  # the kernel's wait was cut to the deadline


def test_a_body_deadline_grows_with_its_length(pair: tuple[socket.socket, socket.socket]) -> None:
    """100 bytes at 100 B/s get 0.3 s + 1 s: sent in 0.8 s, they arrive; sent over 5 s,
    408 at the deadline."""
    server, client = pair
    conn = Connection(server, idle_timeout_s=5, body_timeout_s=0.3, body_min_bytes_per_s=100)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    stop = threading.Event()

    def send(pieces: int, every_s: float) -> threading.Thread:
        def run() -> None:
            for _ in range(pieces):
                if stop.wait(every_s):
                    return
                client.sendall(b"b" * (100 // pieces))

        sender = threading.Thread(target=run)
        sender.start()
        return sender

    client.sendall(head)
    assert conn.next_request() is not None
    sender = send(10, 0.08)
    assert bytes(conn.read_body(100)) == b"b" * 100
    sender.join()
    time.sleep(1.0)  # its kernel wait was cut to under 1 s: it is the idle timeout again
    client.sendall(head)
    assert conn.next_request() is not None
    began = time.monotonic()
    sender = send(100, 0.05)
    try:
        with pytest.raises(HttpError) as late:
            conn.read_body(100)
    finally:
        stop.set()
        sender.join()
    assert late.value.status == 408
    assert 1.2 <= time.monotonic() - began < 4


def test_a_tls_hello_is_refused_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    """No blank line ever comes: refused at its first byte (400), as h11 does, not left
    to the head deadline (408) or the idle timeout."""
    server, client = pair
    conn = Connection(server, idle_timeout_s=5)
    client.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
    with pytest.raises(HttpError) as refused:
        conn.next_request()
    assert refused.value.status == 400


# ---------------------------------------------------------------------- h11 differential
HOST = b"Host: x\r\n"
GET = b"GET / HTTP/1.1\r\n"
POST = b"POST / HTTP/1.1\r\n"
END = b"\r\n"

HEADS: dict[str, bytes] = {
    # Accepted by both.
    "plain": GET + HOST + END,
    "query-and-port": b"GET /healthz?a=1&b=%20 HTTP/1.1\r\nHost: example.com:8500\r\n\r\n",
    "http10-without-host": b"GET / HTTP/1.0\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "mixed-line-ends": b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
    "spaces-inside-value": GET + HOST + b"X-A: a b  c\r\n" + END,
    "white-space-around-value": GET + HOST + b"X-A:\t a\tb \t\r\n" + END,
    "empty-value": GET + HOST + b"X-A:\r\n" + END,
    "obs-text-in-value": GET + HOST + b"X-A: caf\xe9\r\n" + END,
    "repeated-header": GET + HOST + b"X-A: 1\r\nX-A: 2\r\n" + END,
    "every-token-character": GET + HOST + b"X-!#$%&'*+.^_`|~09az: v\r\n" + END,
    "absolute-form": b"GET http://x/healthz HTTP/1.1\r\n" + HOST + END,
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\n" + HOST + END,
    "authority-form": b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
    "lower-case-method": b"get / HTTP/1.1\r\n" + HOST + END,
    "upper-case-host": GET + b"HOST: x\r\n" + END,
    "ipv6-host": GET + b"Host: [::1]:8500\r\n" + END,
    "empty-host": GET + b"Host:\r\n" + END,
    "content-length": POST + HOST + b"Content-Length: 5\r\n" + END,
    "content-length-leading-zeros": POST + HOST + b"Content-Length: 007\r\n" + END,
    "chunked": POST + HOST + b"Transfer-Encoding: chunked\r\n" + END,
    "chunked-any-case": POST + HOST + b"Transfer-Encoding: ChUnKeD\r\n" + END,
    "upgrade": GET + HOST + b"Connection: Upgrade\r\nUpgrade: h2c\r\n" + END,
    # Refused by both.
    "no-host": GET + END,
    "two-hosts": GET + HOST + b"Host: y\r\n" + END,
    "two-hosts-http10": b"GET / HTTP/1.0\r\n" + HOST + b"Host: y\r\n" + END,
    "cr-inside-value": GET + HOST + b"X-A: a\rb\r\n" + END,
    "cr-before-crlf": GET + b"Host: x\r\r\n" + END,
    "cr-as-line-end": GET + b"Host: x\rX-Injected: 1\r\n" + END,
    "nul-in-value": GET + HOST + b"X-A: a\x00b\r\n" + END,
    "vt-in-value": GET + HOST + b"X-A: a\x0bb\r\n" + END,
    "ff-in-value": GET + HOST + b"X-A: a\x0cb\r\n" + END,
    "space-before-colon": GET + b"Host : x\r\n" + END,
    "tab-before-colon": GET + HOST + b"X-A\t: 1\r\n" + END,
    "empty-name": GET + HOST + b": 1\r\n" + END,
    "separator-in-name": GET + HOST + b"X(A): 1\r\n" + END,
    "slash-in-name": GET + HOST + b"X/A: 1\r\n" + END,
    "obs-text-in-name": GET + HOST + b"X-\xe9: 1\r\n" + END,
    "no-colon": GET + HOST + b"X-A 1\r\n" + END,
    "white-space-before-first-header": GET + b" X-A: 1\r\n" + HOST + END,
    "two-spaces-in-request-line": b"GET  / HTTP/1.1\r\n" + HOST + END,
    "space-after-version": b"GET / HTTP/1.1 \r\n" + HOST + END,
    "tab-in-request-line": b"GET\t/ HTTP/1.1\r\n" + HOST + END,
    "lower-case-version": b"GET / http/1.1\r\n" + HOST + END,
    "no-version": b"GET /\r\n" + HOST + END,
    "control-in-target": b"GET /\x01 HTTP/1.1\r\n" + HOST + END,
    "obs-text-in-target": b"GET /\xe9 HTTP/1.1\r\n" + HOST + END,
    "separator-in-method": b"GE(T / HTTP/1.1\r\n" + HOST + END,
    "content-length-letters": GET + HOST + b"Content-Length: abc\r\n" + END,
    "content-length-plus": GET + HOST + b"Content-Length: +5\r\n" + END,
    "content-length-negative": GET + HOST + b"Content-Length: -1\r\n" + END,
    "content-length-space-inside": GET + HOST + b"Content-Length: 5 5\r\n" + END,
    "content-length-hex": GET + HOST + b"Content-Length: 0x5\r\n" + END,
    "content-length-empty": GET + HOST + b"Content-Length:\r\n" + END,
    "content-lengths-differ": GET + HOST + b"Content-Length: 5\r\nContent-Length: 6\r\n" + END,
    "content-length-21-digits": GET + HOST + b"Content-Length: " + b"1" * 21 + b"\r\n" + END,
    "transfer-encoding-gzip": GET + HOST + b"Transfer-Encoding: gzip\r\n" + END,
    "transfer-encoding-gzip-chunked": GET + HOST + b"Transfer-Encoding: gzip, chunked\r\n" + END,
    "transfer-encoding-twice": GET
    + HOST
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
    + END,
    "tls-client-hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    # Deliberately refused where h11 accepts: see DELIBERATE.
    "obs-fold": GET + HOST + b"X-A: a\r\n b\r\n" + END,
    "soh-in-value": GET + HOST + b"X-A: a\x01b\r\n" + END,
    "escape-in-value": GET + HOST + b"X-A: \x1b[31mred\r\n" + END,
    "del-in-value": GET + HOST + b"X-A: a\x7fb\r\n" + END,
    "http-1.2": b"GET / HTTP/1.2\r\n" + HOST + END,
    "http-2.0": b"GET / HTTP/2.0\r\n" + HOST + END,
    "http-0.9": b"GET / HTTP/0.9\r\n" + HOST + END,
    "content-length-list": GET + HOST + b"Content-Length: 5, 5\r\n" + END,
    "content-length-twice": GET + HOST + b"Content-Length: 5\r\nContent-Length: 5\r\n" + END,
    "content-length-19-digits": GET + HOST + b"Content-Length: " + b"1" * 19 + b"\r\n" + END,
    "chunked-and-content-length": POST
    + HOST
    + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
    + END,
    "host-with-space": GET + b"Host: a b\r\n" + END,
    "host-with-userinfo": GET + b"Host: user@x\r\n" + END,
    "host-with-path": GET + b"Host: x/y\r\n" + END,
    # Deliberately accepted where h11 refuses.
    "empty-line-before-request": END + GET + HOST + END,
}

# Where we differ from h11 on purpose, and why.
_FOLD = "obs-fold: RFC 9112 5.2 lets a server refuse it with 400; a proxy may not unfold it"
_CTL = "control characters in a value: RFC 9110 5.5; h11 lets them through for old cookies"
_VERSION = "versions but HTTP/1.0 and 1.1 (h11 parses any digit.digit): 505, or 400"
_LISTS = "a Content-Length list, even of one value: RFC 9112 6.3 allows refusing; one framing"
_TE_CL = "Transfer-Encoding with Content-Length: RFC 9112 6.1 allows refusing (CL.TE smuggling)"
_HOST_SYNTAX = "a Host that is no host[:port]: RFC 9112 3.2 says 400; h11 checks no syntax"
DELIBERATE = {
    "obs-fold": _FOLD,
    "soh-in-value": _CTL,
    "escape-in-value": _CTL,
    "del-in-value": _CTL,
    "http-1.2": _VERSION,
    "http-2.0": _VERSION,
    "http-0.9": _VERSION,
    "content-length-list": _LISTS,
    "content-length-twice": _LISTS,
    "content-length-19-digits": "lengths over 18 digits (int64): 10**18 bytes is no body",
    "chunked-and-content-length": _TE_CL,
    "host-with-space": _HOST_SYNTAX,
    "host-with-userinfo": _HOST_SYNTAX,
    "host-with-path": _HOST_SYNTAX,
    "empty-line-before-request": "RFC 9112 2.2: a server SHOULD ignore empty lines before one",
}


def h11_accepts(head: bytes) -> bool:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return False
    assert isinstance(event, h11.Request), event  # (every head in the table is whole)
    return True


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def we_accept(listener: socket.socket, head: bytes) -> bool:
    """Whether a Connection, over a real socket, takes ``head`` for a request."""
    with socket.create_connection(listener.getsockname(), timeout=10) as client:
        server, _ = listener.accept()
        with server:
            conn = Connection(server, idle_timeout_s=5)
            client.sendall(head)
            try:
                request = conn.next_request()
            except HttpError as exc:
                refused = exc
            else:
                assert request is not None
                return True
    assert refused.status in (400, 505), refused.message
    return False


def test_the_table_covers_both_answers() -> None:
    assert len(HEADS) >= 40
    assert set(DELIBERATE) <= set(HEADS)
    verdicts = {h11_accepts(head) for head in HEADS.values()}
    assert verdicts == {True, False}


@pytest.mark.parametrize("case", list(HEADS))
def test_the_head_parser_agrees_with_h11(listener: socket.socket, case: str) -> None:
    head = HEADS[case]
    theirs, ours = h11_accepts(head), we_accept(listener, head)
    if case in DELIBERATE:
        assert ours != theirs, f"{case}: expected to differ from h11 ({DELIBERATE[case]})"
    else:
        assert ours == theirs, f"{case}: h11 {'accepts' if theirs else 'refuses'} {head!r}"


@pytest.mark.parametrize(
    "case",
    ["no-host", "cr-as-line-end", "obs-fold", "soh-in-value", "chunked-and-content-length"],
)
def test_refused_heads_are_400_and_closed(tmp_path: Path, case: str) -> None:
    with (
        running(serve_settings(tmp_path), load=False) as server,
        connect_from(server, "127.0.0.1") as sock,
    ):
        sock.sendall(HEADS[case])
        status, headers, body = answer(sock)
        assert (status, headers["connection"]) == (400, "close")
        assert b'"bad_request"' in body
