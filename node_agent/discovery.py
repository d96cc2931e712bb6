"""Where this node's inference servers are: the ``/metrics`` URLs the agent scrapes.

Two sources:

- ``static``: a fixed list (``EDGEFLEET_INFERENCE_URLS``), for a node without Kubernetes,
  the loopback demo and tests. A server on the list that does not answer is a failing
  workload.
- ``kubernetes``: the inference pods that the controller's DaemonSets put on this node.
  The agent lists them through its own cluster's API server with its service account,
  which the agent chart allows to get and list pods in the workload namespace and nothing
  else. One ``GET /api/v1/namespaces/NS/pods`` per refresh, restricted to this node
  (``fieldSelector=spec.nodeName``) and to inference pods (``labelSelector``), with
  ``resourceVersion=0`` so the API server answers from its watch cache instead of a
  quorum read of etcd: a thousand agents refreshing every minute cost it about 17 cheap
  reads per second. Each Running pod that is not being deleted is scraped on its pod IP,
  at the port and path of its ``prometheus.io/*`` annotations (falling back to the
  container port named ``http`` and ``/metrics``). Inference pods need no hostPort: pod IPs
  are reachable from the node's own pods on every CNI (a NetworkPolicy in the workload
  namespace must allow the agent in).

  The list is refreshed every ``refresh_s`` and at once when a scrape fails, so a pod that
  went away on purpose (the node moved to another version in a wave) is forgotten, not
  reported as a failed workload. When the API server cannot be reached, the last list is
  kept: the servers themselves are still there to be scraped.

No Kubernetes client library here: one authenticated GET with httpx keeps the agent
light (``controller/kube/client.py`` stays the only importer of ``kubernetes``).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The labels controller/kube/objects.py puts on every inference pod. Spelled out here,
# not imported: the agent never imports the controller.
INFERENCE_POD_SELECTOR = "app.kubernetes.io/name=edgefleet-inference"


@runtime_checkable
class Discovery(Protocol):
    """What the metrics reader asks: which URLs to scrape now."""

    @property
    def dynamic(self) -> bool:
        """True when a server that stops answering may simply have been removed on
        purpose, so the reader should ask again (``urls(refresh=True)``) before calling
        it failed."""
        ...

    def urls(self, *, refresh: bool = False) -> list[str]: ...


class StaticDiscovery:
    dynamic = False

    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = list(urls)

    def urls(self, *, refresh: bool = False) -> list[str]:
        return list(self._urls)


class DiscoveryError(Exception):
    pass


def api_client(
    api_url: str,
    ca_file: Path | None,
    timeout_s: float,
    transport: httpx.BaseTransport | None,
    error: type[Exception],
) -> httpx.Client:
    """An HTTP client of this cluster's API server, trusting ``ca_file`` (the service
    account's CA bundle); ``error`` names a missing bundle in the caller's terms."""
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        if not ca_file.is_file():
            raise error(f"no CA bundle for the Kubernetes API at {ca_file}")
        verify = ssl.create_default_context(cafile=str(ca_file))
    # Only this cluster's API server: no proxy from the environment.
    return httpx.Client(
        base_url=api_url.rstrip("/"),
        timeout=timeout_s,
        verify=verify,
        trust_env=False,
        transport=transport,
    )


def service_account_token(token_file: Path, error: type[Exception]) -> str:
    """Read at every call: projected service-account tokens are rotated by the kubelet."""
    try:
        return token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise error(f"cannot read the service account token: {exc}") from exc


def api_url_from_env(env: Mapping[str, str]) -> str | None:
    """The in-cluster API server address the kubelet gives every pod, or None."""
    host = env.get("KUBERNETES_SERVICE_HOST")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return None
    if ":" in host and not host.startswith("["):  # an IPv6 service IP
        host = f"[{host}]"
    return f"https://{host}:{port}"


def metrics_url(pod: Mapping[str, Any]) -> str | None:
    """The metrics URL of one pod of the pod list, or None when it is not (or no longer)
    a server to scrape: not Running, no IP yet, being deleted, or no port to find."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    ip = status.get("podIP")
    if not ip:
        return None
    annotations = meta.get("annotations") or {}
    port = annotations.get("prometheus.io/port")
    if not port:
        for container in (pod.get("spec") or {}).get("containers") or []:
            for p in container.get("ports") or []:
                if p.get("name") == "http" and p.get("containerPort"):
                    port = str(p["containerPort"])
                    break
            if port:
                break
    if not port or not str(port).isdigit():
        log.warning("inference pod %s has no metrics port to scrape", meta.get("name"))
        return None
    path = annotations.get("prometheus.io/path") or "/metrics"
    if not path.startswith("/"):
        path = "/" + path
    scheme = annotations.get("prometheus.io/scheme") or "http"
    host = f"[{ip}]" if ":" in ip else ip
    return f"{scheme}://{host}:{port}{path}"


class PodDiscovery:
    """This node's inference pods, listed through the Kubernetes API (see the module)."""

    dynamic = True

    def __init__(
        self,
        *,
        api_url: str,
        namespace: str,
        node_name: str,
        token_file: Path = SERVICE_ACCOUNT_DIR / "token",
        ca_file: Path | None = SERVICE_ACCOUNT_DIR / "ca.crt",
        label_selector: str = INFERENCE_POD_SELECTOR,
        refresh_s: float = 60.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float],
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.namespace = namespace
        self.node_name = node_name
        self.token_file = token_file
        self.label_selector = label_selector
        self.refresh_s = refresh_s
        self.clock = clock
        self._http = api_client(api_url, ca_file, timeout_s, transport, DiscoveryError)
        self._urls: list[str] | None = None
        self._next_at = 0.0
        self.lists = 0  # successful lists, for tests and logs

    def close(self) -> None:
        self._http.close()

    def _token(self) -> str:
        return service_account_token(self.token_file, DiscoveryError)

    def list_urls(self) -> list[str]:
        """List this node's inference pods now; their metrics URLs, sorted."""
        params = {
            "fieldSelector": f"spec.nodeName={self.node_name}",
            "labelSelector": self.label_selector,
            "resourceVersion": "0",
        }
        try:
            resp = self._http.get(
                f"/api/v1/namespaces/{self.namespace}/pods",
                params=params,
                headers={"Authorization": f"Bearer {self._token()}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            what = f"{type(exc).__name__}: {exc}"
            raise DiscoveryError(f"Kubernetes API unreachable: {what}") from exc
        if resp.status_code != 200:
            reason = resp.text[:300]
            with contextlib.suppress(ValueError):
                reason = str(resp.json().get("message", reason))
            raise DiscoveryError(f"listing pods in {self.namespace}: {resp.status_code} {reason}")
        try:
            items = resp.json().get("items") or []
        except ValueError as exc:
            raise DiscoveryError(f"the pod list is not JSON: {exc}") from exc
        return sorted({u for u in map(metrics_url, items) if u is not None})

    def urls(self, *, refresh: bool = False) -> list[str]:
        now = self.clock()
        if refresh or self._urls is None or now >= self._next_at:
            try:
                found = self.list_urls()
            except DiscoveryError as exc:
                # Keep scraping what was there; try the API again at the next interval.
                log.warning("cannot discover inference pods: %s", exc)
                self._next_at = now
                return list(self._urls or [])
            if found != self._urls:
                log.info("inference servers on %s: %s", self.node_name, ", ".join(found) or "none")
            self._urls = found
            self._next_at = now + self.refresh_s
            self.lists += 1
        return list(self._urls)
