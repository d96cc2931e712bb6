"""The controller's pull-mode API (``/v1/clusters/NAME/pull``), as the cluster agent
calls it."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from node_agent.cluster.contract import (
    ClusterEnrollIn,
    ClusterEnrollOut,
    DesiredState,
    ObservedReport,
    ReportAck,
)


class ControllerError(Exception):
    pass


class Unreachable(ControllerError):
    """Temporary: network, timeout, 5xx, 429. Try again later."""


class Refused(ControllerError):
    """The controller answered 4xx: the same request will not do better."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status


class PullClient:
    def __init__(
        self,
        base_url: str,
        cluster: str,
        *,
        timeout_s: float = 10.0,
        verify: str | bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.cluster = cluster
        self._http = httpx.Client(
            base_url=f"{base_url.rstrip('/')}/v1/clusters/{cluster}/pull",
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            verify=verify,
            headers={"User-Agent": "edgefleet-cluster-agent"},
            transport=transport,
        )
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        credential: str | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        read_timeout_s: float | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        timeout = (
            httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 5.0), read=read_timeout_s)
            if read_timeout_s is not None
            else httpx.USE_CLIENT_DEFAULT
        )
        try:
            resp = self._http.request(
                method, path, json=json, params=params, headers=headers, timeout=timeout
            )
        except httpx.TransportError as exc:
            raise Unreachable(f"controller unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            raise Unreachable(f"controller answered {resp.status_code}")
        if resp.status_code >= 400:
            detail = resp.text[:300]
            with contextlib.suppress(ValueError):
                detail = str(resp.json().get("detail", detail))
            raise Refused(resp.status_code, detail)
        return resp.json()

    def enroll(self, join_token: str) -> ClusterEnrollOut:
        body = ClusterEnrollIn(join_token=join_token).model_dump()
        return ClusterEnrollOut.model_validate(self._call("POST", "/enroll", json=body))

    def desired(self, credential: str, *, since: int | None, wait_s: float) -> DesiredState:
        params: dict[str, Any] = {"wait": wait_s}
        if since is not None:
            params["since"] = since
        got = self._call(
            "GET",
            "/desired",
            credential=credential,
            params=params,
            read_timeout_s=wait_s + self.timeout_s,  # the controller holds the poll
        )
        return DesiredState.model_validate(got)

    def report(self, credential: str, report: ObservedReport) -> ReportAck:
        got = self._call(
            "POST", "/observed", credential=credential, json=report.model_dump(mode="json")
        )
        return ReportAck.model_validate(got)
