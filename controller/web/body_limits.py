"""Request bodies bounded by their route's limit, before the handler reads past it.

Starlette's multipart parser spools a whole upload to disk before the handler runs, so
a size check in the handler (the artifact store's) comes after the bytes have arrived.
This middleware comes before: a ``Content-Length`` over the limit is answered 413 without
reading any of the body; a body without one (chunked) is counted as it arrives and cut
off where it passes the limit. Either way the answer closes the connection rather than
reading the rest of the upload. (Starlette's RequestBodyLimitMiddleware fixes its limits
when routes are declared, before the settings are known, and answers in its own shape.)
"""

from __future__ import annotations

import re

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.errors import PayloadTooLarge
from controller.settings import Settings
from controller.web.deps import API_V1
from controller.web.errors import error_body

# Room beside the artifact for an upload's other form fields (Starlette caps each at
# 1 MiB; a variant request has three) and the multipart headers and boundaries.
MULTIPART_ALLOWANCE = 4 * 1024 * 1024
# The routes that take a file (controller/registry/endpoints.py): a model push and a
# variant's calibration samples. tests/api/test_bounds.py checks this against the app.
UPLOADS = re.compile(rf"{API_V1}/models/[^/]+/versions(?:/[^/]+/variants)?")
APPLY = f"{API_V1}/apply"


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, str]:
    """The most bytes a request body may have, and the setting that says so."""
    if method == "POST" and UPLOADS.fullmatch(path):
        return (
            settings.max_artifact_bytes + MULTIPART_ALLOWANCE,
            "EDGEFLEET_MAX_ARTIFACT_BYTES, plus 4 MiB for the other form fields",
        )
    if path == APPLY:
        return settings.max_manifest_bytes, "EDGEFLEET_MAX_MANIFEST_BYTES"
    return settings.max_request_bytes, "EDGEFLEET_MAX_REQUEST_BYTES"


def too_large(limit: int, setting: str) -> str:
    return f"request body larger than the limit of {limit} bytes ({setting})"


class LimitRequestBodies:
    """413 in our error shape for a body over its route's limit (:func:`body_limit`).
    A plain ASGI middleware, as ObserveRequests, for the heartbeats' sake.

    When a body without a Content-Length passes the limit, the answer goes out at once;
    the handler's next ``receive()`` says the client left, and whatever it sends after
    is dropped."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = body_limit(self.settings, scope["method"], _route_path(scope))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, receive, send, limit, setting)
            return
        received = 0
        answered = False  # our 413 went out
        started = False  # the handler's answer started

        async def receive_bounded() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        answered = True
                        await _refuse(scope, receive, send, limit, setting)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_answered(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_bounded, send_unless_answered)
        except ClientDisconnect:
            if not answered:
                raise  # the client did leave


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int, setting: str) -> None:
    response = JSONResponse(
        error_body("payload_too_large", too_large(limit, setting)),
        status_code=413,
        # The rest of the body is not read: the connection cannot carry another request.
        headers={"Connection": "close"},
    )
    await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed one itself
    return None


async def read_body(request: Request, *, limit: int, setting: str) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit``: a handler's own
    bound, for a route whose limit is not the middleware's or an app without it."""
    declared = _content_length(request.scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(too_large(limit, setting))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large(limit, setting))
        chunks.append(chunk)
    return b"".join(chunks)
