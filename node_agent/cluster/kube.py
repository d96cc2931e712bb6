"""The cluster agent's calls to its own cluster's API server: plain HTTP with httpx and
the pod's service account, as node_agent/discovery.py does (no Kubernetes client
library on the edge side; controller/kube/client.py stays its only importer).

Writes are server-side apply with the push driver's field manager (``edgefleet``), so a
cluster moved between push and pull mode keeps one owner of its fields, and a field
someone else took over (a human's ``kubectl apply --force``) is a conflict that is
reported, never forced, exactly as in push mode. Only the artifact Secret is forced: it
is edgefleet's alone and its token must reach new pods."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from node_agent.discovery import api_client, service_account_token

FIELD_MANAGER = "edgefleet"


class KubeError(Exception):
    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class KubeApi:
    def __init__(
        self,
        *,
        api_url: str,
        token_file: Path,
        ca_file: Path | None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.token_file = token_file
        self._http = api_client(api_url, ca_file, timeout_s, transport, KubeError)

    def close(self) -> None:
        self._http.close()

    def _token(self) -> str:
        return service_account_token(self.token_file, KubeError)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        """The JSON answer; a KubeError for any status >= 400 not in ``ok``."""
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        content = None
        if body is not None:
            headers["Content-Type"] = content_type
            content = json.dumps(body).encode()
        try:
            resp = self._http.request(
                method, path, params=dict(params or {}), content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            raise KubeError(f"Kubernetes API unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400 and resp.status_code not in ok:
            reason = resp.text[:300]
            with contextlib.suppress(ValueError):
                reason = str(resp.json().get("message", reason))
            raise KubeError(
                f"{method} {path}: {resp.status_code} {reason}", status=resp.status_code
            )
        try:
            out: dict[str, Any] = resp.json() if resp.content else {}
        except ValueError as exc:
            raise KubeError(f"{method} {path}: the answer is not JSON") from exc
        return out

    # -- the calls the agent makes

    def ensure_namespace(self, name: str) -> None:
        """Create it if the identity may; the chart has created it already otherwise."""
        self.request(
            "POST",
            "/api/v1/namespaces",
            body={
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "edgefleet"}},
            },
            ok=(403, 409),
        )

    def apply(self, obj: Mapping[str, Any], *, force: bool = False) -> None:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        base = "/apis/apps/v1" if obj["apiVersion"] == "apps/v1" else "/api/v1"
        plural = {"DaemonSet": "daemonsets", "Secret": "secrets", "Service": "services"}[
            obj["kind"]
        ]
        params = {"fieldManager": FIELD_MANAGER}
        if force:
            params["force"] = "true"
        try:
            self.request(
                "PATCH",
                f"{base}/namespaces/{ns}/{plural}/{name}",
                body=obj,
                params=params,
                content_type="application/apply-patch+yaml",  # JSON is YAML
            )
        except KubeError as exc:
            if exc.status == 409:
                raise KubeError(
                    f"{obj['kind'].lower()} {ns}/{name} has fields owned by another manager "
                    f"(someone edited it with kubectl?): {exc}; edgefleet does not force them",
                    status=409,
                ) from exc
            raise

    def server_version(self) -> tuple[int, int]:
        """(major, minor) of the API server (``/version``, readable by anyone
        authenticated); a suffix such as ``+k3s1`` or ``22+`` is ignored."""
        info = self.request("GET", "/version")

        def number(key: str, default: int) -> int:
            return int("".join(c for c in str(info.get(key, "")) if c.isdigit()) or default)

        return number("major", 1), number("minor", 0)

    def list_nodes(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (
            self.request("GET", "/api/v1/nodes", params={"resourceVersion": "0"}).get("items") or []
        )
        return items

    def label_node(self, node: str, labels: Mapping[str, str | None]) -> None:
        """Merge-patch the node's labels (None removes one); a node gone is no error."""
        self.request(
            "PATCH",
            f"/api/v1/nodes/{node}",
            body={"metadata": {"labels": dict(labels)}},
            content_type="application/merge-patch+json",
            ok=(404,),
        )

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (
            self.request(
                "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector}
            ).get("items")
            or []
        )
        return items

    def list_endpoints(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The Endpoints of the Services with ``selector`` (the endpoints controller gives
        each its Service's labels)."""
        items: list[dict[str, Any]] = (
            self.request(
                "GET",
                f"/api/v1/namespaces/{namespace}/endpoints",
                params={"labelSelector": selector},
            ).get("items")
            or []
        )
        return items

    def list_daemonsets(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (
            self.request(
                "GET",
                f"/apis/apps/v1/namespaces/{namespace}/daemonsets",
                params={"labelSelector": selector},
            ).get("items")
            or []
        )
        return items

    def delete_daemonset(self, namespace: str, name: str) -> None:
        self.request(
            "DELETE",
            f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}",
            body={"propagationPolicy": "Foreground"},
            ok=(404,),
        )

    def list_services(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (
            self.request(
                "GET",
                f"/api/v1/namespaces/{namespace}/services",
                params={"labelSelector": selector},
            ).get("items")
            or []
        )
        return items

    def delete_service(self, namespace: str, name: str) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/services/{name}", ok=(404,))
