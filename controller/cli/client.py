"""The CLI's HTTP client: every call goes through the REST API, so the CLI works the
same against a laptop demo and a production controller behind an ingress."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

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


class ApiClient:
    def __init__(self, base_url: str | None = None, *, timeout_s: float = 60.0) -> None:
        self.base_url = (base_url or os.environ.get("EDGEFLEET_API_URL") or DEFAULT_API_URL).rstrip(
            "/"
        )
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

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
                raise ApiError(resp.status_code, body.get("error", "error"), body.get("detail"))
            except ValueError:
                raise ApiError(resp.status_code, "error", resp.text[:500]) from None
        return resp.json() if resp.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def push_version(self, path: Path, *, name: str, version: str, metadata: str | None) -> Any:
        data = {"version": version}
        if metadata is not None:
            data["metadata"] = metadata
        with path.open("rb") as fh:
            return self.request(
                "POST",
                f"/v1/models/{name}/versions",
                data=data,
                files={"file": (path.name, fh, "application/octet-stream")},
            )
