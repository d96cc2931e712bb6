"""The CLI's HTTP client: every call goes through the REST API, so the CLI works the
same against a laptop demo and a production controller behind an ingress."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from controller.cli.config import current_context

DEFAULT_API_URL = "http://127.0.0.1:8080"


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail

    def render(self) -> str:
        if isinstance(self.detail, list):
            lines = []
            for item in self.detail:
                loc = ".".join(str(p) for p in item.get("loc", []))
                lines.append(f"  {loc}: {item.get('msg')}")
            return f"{self.error} ({self.status}):\n" + "\n".join(lines)
        return f"{self.error} ({self.status}): {self.detail}"


class CountedReader:
    """A file that tells ``advance`` how many bytes each read returned: httpx's multipart
    encoder reads the upload in 64 KiB chunks as it sends them, so this follows the
    upload itself (and the file is never read into memory whole)."""

    def __init__(self, fh: BinaryIO, advance: Callable[[int], None]) -> None:
        self._fh = fh
        self._advance = advance

    def fileno(self) -> int:
        return self._fh.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self._advance(len(chunk))
        return chunk


class ApiClient:
    """The controller URL and token come from the arguments, else ``EDGEFLEET_API_URL``
    and ``EDGEFLEET_TOKEN``, else the current context of the CLI config file."""

    def __init__(
        self, base_url: str | None = None, *, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        context = current_context()
        saved = context.server.rstrip("/") if context and context.server else None
        self.base_url = (
            base_url or os.environ.get("EDGEFLEET_API_URL") or saved or DEFAULT_API_URL
        ).rstrip("/")
        # A context's token goes to that context's server only, never to another URL
        # given on the command line or in the environment.
        if token is None:
            token = os.environ.get("EDGEFLEET_TOKEN")
        if token is None and context is not None and self.base_url == saved:
            token = context.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                0,
                "unreachable",
                f"cannot reach the controller at {self.base_url} ({exc}); is `edgefleet "
                "server` running? Set EDGEFLEET_API_URL or --api-url to point elsewhere",
            ) from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
                detail = body.get("detail")
                if resp.status_code == 401:
                    detail = f"{detail}; set EDGEFLEET_TOKEN, or run `edgefleet login --token ...`"
                raise ApiError(resp.status_code, body.get("error", "error"), detail)
            except ValueError:
                raise ApiError(resp.status_code, "error", resp.text[:500]) from None
        return resp.json() if resp.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def push_version(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        metadata: str | None,
        parent: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Upload the file as it is read (``progress`` is told each chunk's size)."""
        data = {"version": version}
        if metadata is not None:
            data["metadata"] = metadata
        if parent is not None:
            data["parent"] = parent
        with path.open("rb") as fh:
            body = fh if progress is None else CountedReader(fh, progress)
            return self.request(
                "POST",
                f"/v1/models/{name}/versions",
                data=data,
                files={"file": (path.name, body, "application/octet-stream")},
            )

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def get_or_none(self, path: str, **params: Any) -> Any:
        """GET, with None instead of an error when the resource does not exist (404)."""
        try:
            return self.get(path, **params)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, manifests: str, *, dry_run: bool = False) -> Any:
        """POST a YAML stream to ``/v1/apply`` (all or nothing on the server side)."""
        return self.request(
            "POST",
            "/v1/apply",
            params={"dryRun": "true"} if dry_run else None,
            content=manifests.encode("utf-8"),
            headers={"content-type": "application/yaml"},
        )
