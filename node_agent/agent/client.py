"""The controller's agent API (``/v1/agents``), as the agent calls it."""

from __future__ import annotations

import json
from typing import Any

import httpx
from pydantic import BaseModel

from node_agent.contract import BenchmarkResult


class ControllerError(Exception):
    pass


class Unreachable(ControllerError):
    """Temporary: network, timeout, 5xx, 429. Try again later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Refused(ControllerError):
    """The controller answered 4xx: retrying the same request will not help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Enrollment(BaseModel):
    credential: str
    heartbeat_interval_s: float
    last_seq: int = 0


class Ack(BaseModel):
    accepted: int
    duplicates: int
    last_seq: int
    # Benchmark jobs waiting for this node (0 from controllers that predate them).
    benchmarks_pending: int = 0


class ControllerClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        verify: str | bool = True,
        user_agent: str = "edgefleet-agent",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            verify=verify,
            headers={"User-Agent": user_agent},
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, *, content: str, headers: dict[str, str]) -> Any:
        return self._request(
            "POST", path, content=content, headers={"Content-Type": "application/json", **headers}
        )

    def _request(
        self, method: str, path: str, *, content: str | None = None, headers: dict[str, str]
    ) -> Any:
        try:
            resp = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code < 300:
            if not resp.content:  # 204
                return None
            try:
                return resp.json()
            except ValueError as exc:
                raise Unreachable(f"{resp.status_code} with a body that is not JSON") from exc
        try:
            detail = str(resp.json().get("detail", resp.text))
        except ValueError:
            detail = resp.text[:300]
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            retry_after = resp.headers.get("Retry-After", "")
            raise Unreachable(
                f"{resp.status_code}: {detail}",
                retry_after_s=float(retry_after) if retry_after.isdigit() else None,
            )
        raise Refused(resp.status_code, detail)

    def enroll(self, *, cluster: str, node: str, join_token: str) -> Enrollment:
        body = json.dumps({"cluster": cluster, "node": node, "join_token": join_token})
        return Enrollment.model_validate(self._post("/v1/agents/enroll", content=body, headers={}))

    def heartbeats(self, credential: str, body: str) -> Ack:
        """``body``: a JSON list of heartbeats, oldest first."""
        got = self._post(
            "/v1/agents/heartbeat",
            content=body,
            headers={"Authorization": f"Bearer {credential}"},
        )
        return Ack.model_validate(got)

    def benchmark_jobs(self, credential: str) -> Any:
        """The benchmark jobs waiting for this node: a JSON list of ``BenchmarkJob``
        (returned unparsed: the agent reads them one by one)."""
        return self._request(
            "GET", "/v1/agents/benchmarks", headers={"Authorization": f"Bearer {credential}"}
        )

    def post_benchmark_result(self, credential: str, job_id: int, result: BenchmarkResult) -> None:
        self._post(
            f"/v1/agents/benchmarks/{job_id}",
            content=result.model_dump_json(exclude_none=True),
            headers={"Authorization": f"Bearer {credential}"},
        )


def artifact_url(controller_url: str, url: str) -> str:
    """A job's artifact URL, absolute (the controller may send one relative to itself,
    under the same path prefix as its API)."""
    if httpx.URL(url).is_absolute_url:
        return url
    return controller_url.rstrip("/") + "/" + url.lstrip("/")
