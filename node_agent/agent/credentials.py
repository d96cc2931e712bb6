"""The node credential: kept on disk for the owner only, sent to the controller only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator
from pathlib import Path

import httpx


class ControllerAuth(httpx.Auth):
    """The node credential on artifact downloads, sent to the controller's own origin
    only: an artifact URL elsewhere (a CDN, an object store) never sees it. (httpx drops
    the header itself on a redirect to another origin.)"""

    def __init__(self, controller_url: str, credential: Callable[[], str | None]) -> None:
        self.origin = _origin(httpx.URL(controller_url))
        self.credential = credential

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        credential = self.credential()
        if credential and _origin(request.url) == self.origin:
            request.headers["Authorization"] = f"Bearer {credential}"
        yield request


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by the owner only, atomically: the file is
    created with mode 0600 (never world-readable, not even for an instant) and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
