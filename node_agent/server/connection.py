"""The HTTP/1.1 connection layer of ``edgefleet-serve``: one :class:`Connection` per
client socket, one thread each (the stdlib's ``socketserver`` runs them), no dependency.

Built for a model server's hot path, where the stdlib's ``BaseHTTPRequestHandler`` cost
more than a small CNN's inference leaves room for. That one reads a head line by line
through a buffered file, copies the body into a new ``bytes`` and writes through a second
file object; all of it Python that runs on caches the inference has just evicted. Here:

- One receive buffer per connection. A request head is parsed from it in one pass; the
  body is received into it in place and handed out as a ``memoryview`` (``np.frombuffer``
  on it is the tensor: no copy after the kernel's). A client that repeats its head length,
  as every client with fixed headers does, gets its body 64-byte aligned.
- A response leaves in one ``sendmsg``: head and payload, no join.
- Busy polling (``busy_poll_s``): after an answer, the thread polls its socket for the
  client's next request for a bounded time instead of sleeping at once. Waking a sleeping
  thread costs tens of microseconds on a VM (an idle vCPU halts); a client at concurrency
  1 is back within that window. It stops as soon as a client is slower than the window,
  resumes when one is quicker again, and the caller turns it off while any other request
  is in flight (the CPU is theirs). The rest of a request already arriving (a body longer
  than one segment) is polled for too, until a poll for it is once in vain. The CPU it
  costs is counted (``polled_s``).

Limits: a request line of 64 KiB (414), 100 header lines of 64 KiB each and 256 KiB of
head in all (431). Keep-alive idles out after ``idle_timeout_s`` (the kernel's
``SO_RCVTIMEO``: one system call per receive, none for a timer); sends time out alike.

Slow clients (each holds a thread and a connection slot): a head must arrive whole within
``head_timeout_s`` of its first byte, a body within ``body_timeout_s`` plus one second per
``body_min_bytes_per_s`` of it; else 408 and the connection closes (a trickle of one byte
a second never lets the idle timeout pass). The clock is read only once a head or a body
is found incomplete after a receive, so a request that arrives in one piece pays nothing
for it; the kernel's wait for the next receive is then cut to the deadline (a system
call), for a head at once, for a body only once it has been slow for ``_PATIENCE_S`` (a
large body arriving in several receives is the hot path too), and put back after it.

Heads are parsed as strictly as h11 where it matters for request smuggling and header
injection, and stricter where RFC 9112 lets a server be (see :func:`parse_head`).

The :class:`Listener` accepts the connections: one thread each, at most so many at a time
and from one address.

(Over 600 lines: one job, a client's connection from its accept to its last answer, and
the one part of the server built on the stdlib alone, tested alone; the listener is the
last hundred lines.)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import re
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Generic, TypeVar

from typing_extensions import Buffer

MAX_LINE = 65536
MAX_HEADER_LINES = 100
MAX_HEAD = 256 * 1024
ALIGN = 64
INITIAL_BUFFER = 64 * 1024
KEEP_BUFFER = 1024 * 1024  # a larger one is let go when its client is slow to come back
PHRASES = {int(status): status.phrase for status in HTTPStatus}
# Deadlines (the settings' defaults): see the module's docstring.
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
BODY_MIN_BYTES_PER_S = 64 * 1024
_PATIENCE_S = 0.25  # a body still incomplete this long after its first receive is slow

# RFC 9110 5.1 and 5.5, RFC 9112 3, as h11's _abnf.py writes them: a name is a token; a
# value is visible characters and obs-text (0x80-0xFF) with spaces and tabs only inside
# (no control character but HTAB: h11 lets most through, RFC 9110 5.5 lets a server
# refuse them); optional white space around the value. Possessive: no backtracking, so
# a 256 KiB head costs a few ms to refuse, not tens.
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rf"{_TOKEN.pattern} [\x21-\x7e]+ HTTP/1\.[01]")  # method target version
_FIELD = (
    r"[-!#$%&'*+.^_`|~0-9A-Za-z]++:[ \t]*+"
    r"(?:[\x21-\x7e\x80-\xff]++(?:[ \t]++[\x21-\x7e\x80-\xff]++)*+)?+[ \t]*+"
)
_FIELDS = re.compile(rf"(?:{_FIELD}(?:\r?\n(?!\Z)|\Z))*+")  # every header line, at once
_ONE_FIELD = re.compile(_FIELD)
_LENGTH = re.compile(r"[0-9]{1,18}")  # (int64; 10**18 bytes is no body anyway)
# uri-host [":" port] (RFC 3986 3.2.2): an IP literal in brackets or a reg-name/IPv4.
_HOST = re.compile(
    r"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?"
)

_perf = time.perf_counter
log = logging.getLogger("node_agent.serve")


def _timeval(seconds: float) -> bytes:
    return struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))


class HttpError(Exception):
    """A request the connection cannot go on after: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined by ", "
    keep_alive: bool


def _address(buffer: bytearray | mmap.mmap) -> int:
    """Where ``buffer``'s bytes start in memory (the export ends with this call)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class Connection:
    """One client socket: :meth:`next_request`, :meth:`read_body`, :meth:`send`."""

    body_address = 0  # where the last body read_body returned starts in memory

    def __init__(
        self,
        sock: socket.socket,
        *,
        idle_timeout_s: float,
        busy_poll_s: float = 0,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        body_min_bytes_per_s: float = BODY_MIN_BYTES_PER_S,
    ):
        self.sock = sock
        self.busy_poll_s = busy_poll_s
        self.polled_s = 0.0  # CPU time spent polling, for the caller's metrics
        self.poll_hits = 0
        self.idle_timeout_s = idle_timeout_s
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s
        self.body_min_bytes_per_s = body_min_bytes_per_s
        self._wait_s = idle_timeout_s  # the kernel's limit on one receive (SO_RCVTIMEO)
        sock.settimeout(None)  # blocking: one system call per receive
        timeval = _timeval(idle_timeout_s)
        with contextlib.suppress(OSError):  # (not every platform has both)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer: bytearray | mmap.mmap
        self._new_buffer(INITIAL_BUFFER)
        self._start = self._end = 0  # unread bytes: buffer[_start:_end]
        self._head_hint = 0  # the last head's length, to align the next body
        self._last_head = b""  # the last head's bytes and what they parsed to
        self._last_request = Request("", "", "", {}, False)
        self._answered_at = 0.0  # when the last response left
        self._poll_next = True  # the client came back within the window last time
        self._poll_rest = False  # poll for the rest of the request on its way

    def _new_buffer(self, size: int) -> None:
        if size > INITIAL_BUFFER:
            # A mapping of its own: pages are committed as bytes arrive, and given back
            # to the system when the buffer is let go (malloc would keep them).
            self._buffer = mmap.mmap(-1, size)
        else:
            self._buffer = bytearray(size)
        self._address = _address(self._buffer)
        self._base = -self._address % ALIGN  # the first 64-byte aligned offset
        self._view = memoryview(self._buffer)

    # ------------------------------------------------------------------ receiving
    def _recv(self, poll: bool = False, between: bool = False) -> int:
        """Receive what the socket has into the buffer's free space; 0 at EOF. Polls
        first when ``poll``; raises ``TimeoutError`` when the kernel's wait passes.
        ``between``: the wait between two requests, where a large buffer is let go
        before sleeping (a client that is not quick keeps no more than KEEP_BUFFER)."""
        if poll:
            if (n := self._poll(counted=between)) is not None:
                return n
            self._poll_rest = False  # a slow sender: sleep for the rest of this request
        if between and len(self._buffer) > KEEP_BUFFER and self._start == self._end:
            self._new_buffer(INITIAL_BUFFER)
            self._rewind()
        try:
            n = self.sock.recv_into(self._view[self._end :])
        except BlockingIOError as exc:  # SO_RCVTIMEO
            raise TimeoutError("idle timeout") from exc
        self._end += n
        return n

    def _set_wait(self, seconds: float) -> None:
        """Limit the next receives to ``seconds`` each (SO_RCVTIMEO: a system call, made
        for slow requests only, and once after them to put the idle timeout back)."""
        seconds = max(seconds, 0.001)  # (a zero timeval is no limit at all)
        if seconds != self._wait_s:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
            self._wait_s = seconds

    def _poll(self, counted: bool) -> int | None:
        """Spin on the socket for up to ``busy_poll_s``: what arrived, or ``None``.
        ``counted``: a hit is a request caught (else the rest of one on its way)."""
        free = self._view[self._end :]
        started = _perf()
        deadline = started + self.busy_poll_s
        while True:
            try:
                n = self.sock.recv_into(free, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if _perf() < deadline:
                    continue
                self.polled_s += _perf() - started
                return None
            self.polled_s += _perf() - started
            self.poll_hits += counted and n > 0
            self._end += n
            return n

    def _rewind(self) -> None:
        """Nothing pending: receive from where a head of the last one's length puts the
        body on an aligned offset."""
        self._start = self._end = self._base + (-self._head_hint % ALIGN)

    def _make_room(self, needed: int, align_at: int | None = None) -> None:
        """Free space for ``needed`` more bytes than the unread ones; ``align_at``: an
        offset into the unread bytes that must land 64-byte aligned."""
        pending = self._end - self._start
        size = len(self._buffer)
        misaligned = align_at is not None and (self._start + align_at - self._base) % ALIGN
        if self._end + needed <= size and not misaligned:
            return
        shift = 0 if align_at is None else -align_at % ALIGN
        want = self._base + shift + pending + needed
        unread: bytes | memoryview = self._view[self._start : self._end]
        if want > size:
            self._new_buffer(max(want + ALIGN, 2 * size))
        else:
            unread = bytes(unread)  # (moved within the same buffer: copied out first)
        start = self._base + shift
        self._buffer[start : start + pending] = unread
        self._start, self._end = start, start + pending

    def next_request(self, *, poll: bool = False) -> Request | None:
        """The next request's head, or ``None`` when the client closed or idled out
        between requests. ``poll``: busy-poll for it (if the connection is set up to and
        the client was quick last time). Raises :class:`HttpError` for a malformed head,
        and a 408 one for a head not whole ``head_timeout_s`` after its first byte."""
        if self._start == self._end:
            self._rewind()
        poll = poll and self.busy_poll_s > 0 and self._poll_next
        # The rest of a request already arriving is polled for too, until once in vain.
        self._poll_rest = self.busy_poll_s > 0
        waited = False
        scanned = 0  # how much of the pending head has been searched in vain
        deadline: float | None = None  # once a head is found incomplete: when it must end
        while True:
            buffer, start, end = self._buffer, self._start, self._end
            while start < end and buffer[start] in (10, 13):  # RFC 9112 2.2: empty lines
                if buffer[start] == 13 and (start + 1 == end or buffer[start + 1] != 10):
                    break  # (a CR alone, or one whose LF is still on its way)
                start = self._start = start + (2 if buffer[start] == 13 else 1)
                scanned = 0
            last = self._last_head
            if (
                last
                and end - start >= len(last)
                and buffer.find(last, start, start + len(last)) == start
            ):
                # The same head as the last request's, byte for byte (a client with fixed
                # headers and a fixed body size): the same request, already parsed.
                self._start = start + len(last)
                return self._last_request
            # The blank line that ends the head: CRLF CRLF (found as LF CR LF), or a bare
            # LF LF if one comes first. (Resumed where the last search ended: a head
            # arriving in small pieces is searched once, not once per piece.)
            since = start + max(0, scanned - 2)
            stop = buffer.find(b"\n\r\n", since, end)
            lf = buffer.find(b"\n\n", since, end if stop < 0 else stop + 1)
            if lf >= 0:
                stop, after = lf, lf + 2
                break
            if stop >= 0:
                after = stop + 3
                break
            scanned = end - start
            if scanned > MAX_HEAD:
                raise self._too_long(start, end)
            if start != end:
                # A head begun, not whole (never the case of one that arrives in one
                # piece): it has a deadline from here, and the kernel's wait ends there.
                # A first byte no request line starts with (a TLS hello, say) is refused
                # at once, as h11 does, rather than waited for.
                if buffer[start] < 0x21 and buffer[start] != 13:
                    raise HttpError(400, "not an HTTP/1.1 request")
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.head_timeout_s
                elif now >= deadline:
                    raise self._late_head()
                self._set_wait(min(deadline - now, self.idle_timeout_s))
            elif deadline is not None:  # (what began was a CR of an empty line: idle again)
                deadline = None
                self._set_wait(self.idle_timeout_s)
            if end == len(buffer):
                self._make_room(INITIAL_BUFFER)
            del buffer  # (a sleeping wait must not keep a buffer _recv lets go alive)
            try:
                if not waited and start == end and self._answered_at:
                    waited = True
                    n = self._recv(poll, between=True)
                    self._poll_next = _perf() - self._answered_at <= self.busy_poll_s
                else:
                    # The rest of a head on its way: polled for (if polling at all).
                    n = self._recv(self._poll_rest and start != end, between=start == end)
            except TimeoutError:
                if deadline is None:
                    raise  # idle between requests: closed without a word
                raise self._late_head() from None
            if n == 0:
                return None  # closed (inside a head too: nobody is left to answer)
        if deadline is not None:
            self._set_wait(self.idle_timeout_s)
        if after - start > MAX_HEAD:
            raise self._too_long(start, after)
        cut = stop - 1 if stop > start and buffer[stop - 1] == 13 else stop  # its CR
        self._head_hint = after - start
        self._start = after
        request = parse_head(str(self._view[start:cut], "latin-1"))
        self._last_head, self._last_request = bytes(self._view[start:after]), request
        return request

    def _late_head(self) -> HttpError:
        return HttpError(408, f"the request head took over {self.head_timeout_s:g} s")

    def _too_long(self, start: int, end: int) -> HttpError:
        if self._buffer.find(b"\n", start, min(end, start + MAX_LINE + 2)) < 0:
            return HttpError(414, f"the request line is over {MAX_LINE} bytes")
        return HttpError(431, f"the request head is over {MAX_HEAD} bytes")

    def read_body(self, length: int) -> memoryview:
        """The next ``length`` bytes, in place: valid until the next request on this
        connection. Raises ``ConnectionError`` if the client closes first, and a 408
        :class:`HttpError` if they take over ``body_timeout_s`` plus ``length`` /
        ``body_min_bytes_per_s`` seconds from the first receive that leaves them
        incomplete (or one receive waits ``idle_timeout_s`` in vain).

        The buffer grows as the bytes arrive, at most doubling what is here: a head that
        announces 64 MiB commits no memory until the bytes come. The body's first bytes
        are moved once to a 64-byte aligned offset if they are not there (free when the
        client repeats its head; see next_request)."""
        have = self._end - self._start
        if have < length:
            self._make_room(min(length - have, max(INITIAL_BUFFER, have)), align_at=0)
            began: float | None = None  # the first receive that left the body incomplete
            deadline = 0.0
            while (have := self._end - self._start) < length:
                if self._end == len(self._buffer):
                    self._make_room(min(length - have, max(INITIAL_BUFFER, have)))
                try:
                    if self._recv(self._poll_rest) == 0:  # (the rest is on its way)
                        raise ConnectionError("the body ended before Content-Length")
                except TimeoutError:
                    raise self._late_body(length) from None
                if self._end - self._start < length:  # incomplete after a receive
                    now = time.monotonic()
                    if began is None:
                        began = now
                        deadline = now + self.body_timeout_s + length / self.body_min_bytes_per_s
                    elif now >= deadline:
                        raise self._late_body(length)
                    elif now - began >= _PATIENCE_S:  # slow: its receives wait no longer
                        self._set_wait(min(deadline - now, self.idle_timeout_s))
            if began is not None:
                self._set_wait(self.idle_timeout_s)
        elif (self._start - self._base) % ALIGN and length >= ALIGN and have - length <= length:
            # Here already (pipelined): aligned only if that moves little besides it.
            self._make_room(0, align_at=0)
        start = self._start
        self._start += length
        self.body_address = self._address + start
        return self._view[start : start + length]

    def _late_body(self, length: int) -> HttpError:
        allowed = self.body_timeout_s + length / self.body_min_bytes_per_s
        return HttpError(408, f"the {length}-byte request body took over {allowed:g} s")

    def discard(self, length: int, budget_s: float) -> None:
        """Read and drop up to ``length`` body bytes for at most ``budget_s``, so the
        client reads the answer instead of a reset from unread data."""
        deadline = time.monotonic() + budget_s
        take = min(length, self._end - self._start)
        self._start += take
        left = length - take
        with contextlib.suppress(OSError):
            self.sock.settimeout(0.5)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.sock.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    # ------------------------------------------------------------------ sending
    def send(
        self,
        head: bytes,
        body: Buffer = b"",
        nbytes: int | None = None,
        before_waiting: Callable[[], object] | None = None,
    ) -> None:
        """Head and body in one ``sendmsg`` (more calls only if the socket takes less).
        ``body``: any C-contiguous buffer (a numpy array's ``.data`` too); ``nbytes``:
        its size in bytes, when the caller knows it already; ``before_waiting``: called
        when the client is not reading fast enough to take it all at once."""
        size = len(head) + (memoryview(body).nbytes if nbytes is None else nbytes)
        try:
            try:  # what the socket takes without waiting, then (rarely) the rest
                sent = self.sock.sendmsg([head, body], [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent < size:
                if before_waiting is not None:
                    before_waiting()
                self._send_rest([head, body], sent)
        except BlockingIOError as exc:  # SO_SNDTIMEO: the client stopped reading
            raise TimeoutError("send timed out") from exc
        self._answered_at = _perf()

    def _send_rest(self, parts: list[Buffer], sent: int) -> None:
        views = [memoryview(part).cast("B") for part in parts]
        while views:
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][sent:]
                sent = self.sock.sendmsg(views)


def parse_head(head: str) -> Request:
    """The request line and headers of a head (latin-1, without its blank line); raises
    :class:`HttpError`. Lines may end in CRLF or a bare LF, as h11 takes them; refused:

    - 400, as h11 does: a method that is not a token, a target of anything but visible
      ASCII, separators other than one space; a header name that is not a token or has
      white space before its colon, a CR, NUL, LF, VT or FF in a value, a header line
      before any other starting with white space; no Host in HTTP/1.1, two Host lines; a
      Content-Length of anything but digits, two that differ; any Transfer-Encoding but
      one ``chunked`` (the endpoints answer that one 411);
    - 400, where h11 accepts and RFC 9112 lets a server refuse: obsolete line folding
      (5.2), other control characters in a value (RFC 9110 5.5), a Host value that is no
      host[:port] (3.2), Content-Length lists, even of one value twice (6.3), and
      Transfer-Encoding with Content-Length (6.1: the framing two parsers can disagree on);
    - 505 for versions other than HTTP/1.0 and 1.1 (400 for HTTP/2 and others that are
      not 1.x); 414 and 431 beyond 64 KiB a line, 100 header lines."""
    if head.count("\n") == head.count("\r\n"):
        lines = head.split("\r\n")
    else:
        lines = [line.removesuffix("\r") for line in head.split("\n")]
    line = lines[0]
    if len(line) > MAX_LINE:
        raise HttpError(414, f"the request line is over {MAX_LINE} bytes")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"bad request line {line[:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"{version[:20]} is not supported")
    if not _REQUEST_LINE.fullmatch(line):
        raise HttpError(400, f"bad request line {line[:100]!r}")
    if len(lines) > MAX_HEADER_LINES + 1:
        raise HttpError(431, f"more than {MAX_HEADER_LINES} header lines")
    fields: dict[str, str] = {}
    for raw in lines[1:]:
        if len(raw) > MAX_LINE:
            raise HttpError(431, f"a header line is over {MAX_LINE} bytes")
        name, _, value = raw.partition(":")
        key, value = name.lower(), value.strip(" \t")
        if key in fields:
            if key == "host":
                raise HttpError(400, "more than one Host header")
            fields[key] = f"{fields[key]}, {value}"
        else:
            fields[key] = value
    # The lines' syntax, checked in one pass (cheaper than a match a line).
    if len(lines) > 1 and not _FIELDS.fullmatch(head, head.index("\n") + 1):
        raise _bad_field(next((raw for raw in lines[1:] if not _ONE_FIELD.fullmatch(raw)), ""))
    host = fields.get("host")
    if host is None:
        if version == "HTTP/1.1":
            raise HttpError(400, "an HTTP/1.1 request needs a Host header")
    elif not _HOST.fullmatch(host):
        raise HttpError(400, f"bad Host {host[:100]!r}")
    length = fields.get("content-length")
    if length is not None and not _LENGTH.fullmatch(length):
        raise HttpError(400, f"bad Content-Length {length[:40]!r}")
    coding = fields.get("transfer-encoding")
    if coding is not None:  # (one framing a body can be read by, or no request)
        if length is not None:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if coding.lower() != "chunked":
            raise HttpError(400, f"Transfer-Encoding {coding[:40]!r}")
    connection = fields.get("connection", "").lower()
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    return Request(method, target, version, fields, keep_alive)


def _bad_field(line: str) -> HttpError:
    """What is wrong with a header line that is not a field."""
    if line[:1] in (" ", "\t"):
        return HttpError(400, "obsolete line folding (a line starting with white space)")
    name, colon, _ = line.partition(":")
    if not colon:
        return HttpError(400, f"a header line without a colon: {line[:100]!r}")
    if not _TOKEN.fullmatch(name):
        return HttpError(400, f"bad header name {name[:100]!r}")
    return HttpError(400, f"control characters in the value of {name}")


# ---------------------------------------------------------------------- the listener
def _busy(detail: bytes) -> bytes:
    body = b'{"error": "too_many_connections", "detail": "%s"}' % detail
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


_BUSY = _busy(b"retry later")
_CLIENT_BUSY = _busy(b"too many connections from this address; retry later")
AppT = TypeVar("AppT")  # what the handlers serve


class Listener(socketserver.ThreadingTCPServer, Generic[AppT]):
    """One thread per connection, at most ``max_connections`` at a time and
    ``max_connections_per_client`` from one address: one more is answered 503 and closed
    at once (each connection holds a thread and a buffer). Per connection, not per
    request: the accepting thread counts, the connection's own thread counts it out.
    ``app`` is what the connections' handlers serve (``self.server.app`` to them);
    ``refused`` and ``client_refused`` count the connections turned away."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        app: AppT,
        *,
        max_connections: int,
        max_connections_per_client: int,
        refused: Callable[[], object],
        client_refused: Callable[[], object],
    ) -> None:
        super().__init__(address, handler)
        self.app = app
        self.slots = threading.Semaphore(max_connections)
        self.per_client = max_connections_per_client
        self.clients: dict[str, int] = {}  # open connections by client address (none: absent)
        self.clients_lock = threading.Lock()
        self.refused = refused
        self.client_refused = client_refused

    def process_request(self, request: Any, client_address: Any) -> None:
        client = client_address[0]
        with self.clients_lock:
            if (count := self.clients.get(client, 0)) < self.per_client:
                self.clients[client] = count + 1
        if count >= self.per_client:
            self.client_refused()
            self._turn_away(request, _CLIENT_BUSY)
            return
        if not self.slots.acquire(blocking=False):
            self._leave(client)
            self.refused()
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


class Listener6(Listener[AppT]):
    address_family = socket.AF_INET6
