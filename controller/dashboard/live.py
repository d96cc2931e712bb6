"""Live dashboard pages: a page's body, rendered again every few seconds on a connection
of its own and sent as a server-sent event when it changed; a few lines of script in the
page (controller/dashboard/pages.py) swap it in. No framework, no build step.

Each stream is bounded: so many at once per process (a 503 beyond, and the page falls
back to reloading itself), so long each (the browser's EventSource then reconnects and is
authorized again: a revoked token or an expired session ends the updates)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from controller.db.session import session_scope
from controller.errors import NotFound
from controller.settings import Settings
from controller.web.errors import error_body

# The browser waits this long before it reconnects a stream that ended.
RECONNECT_MS = 1000


class Slots:
    """How many live streams this process serves, against its limit. The event loop is
    one thread: no lock needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1


def event(name: str, data: str) -> str:
    """One server-sent event. Each line of ``data`` becomes a ``data:`` field; a carriage
    return would end a line too, so it is sent as its character reference."""
    lines = data.replace("\r", "&#13;").split("\n")
    return f"event: {name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def _render(render: Callable[[Session], str]) -> str | None:
    with session_scope() as session:
        try:
            return render(session)
        except NotFound:
            return None


async def events(
    render: Callable[[Session], str], *, interval_s: float, duration_s: float
) -> AsyncIterator[str]:
    """The page's body now, then again whenever it changed, until ``duration_s`` is over
    or the object is gone. Between changes a comment line keeps the connection known to
    be alive (a closed one ends the stream at the next write)."""
    yield f"retry: {RECONNECT_MS}\n\n"
    deadline = anyio.current_time() + duration_s
    last: str | None = None
    while True:
        body = await run_in_threadpool(_render, render)
        if body is None:
            yield event("gone", "")
            return
        yield event("page", body) if body != last else ":\n\n"
        last = body
        left = deadline - anyio.current_time()
        if left <= 0:
            return
        await anyio.sleep(min(interval_s, left))


class LiveStream(StreamingResponse):
    """A live page's event stream, holding one of the process's slots while it runs."""

    def __init__(self, render: Callable[[Session], str], slots: Slots, settings: Settings) -> None:
        super().__init__(
            events(
                render,
                interval_s=settings.dashboard_live_interval_s,
                duration_s=settings.dashboard_live_stream_s,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Taken here, where it is also given back whatever happens, rather than in the
        # handler: a response never sent would otherwise keep its slot forever.
        if not self.slots.take():
            busy = JSONResponse(
                error_body(
                    "service_unavailable",
                    f"{self.slots.limit} live dashboard pages are open already "
                    "(EDGEFLEET_DASHBOARD_LIVE_STREAMS)",
                ),
                status_code=503,
                headers={"Retry-After": "30"},
            )
            await busy(scope, receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slots.give()
