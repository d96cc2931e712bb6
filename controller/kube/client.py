"""The Kubernetes driver. This is the only module that imports the ``kubernetes``
client library: it translates the library's errors into our own hierarchy, retries the
transient ones with a configurable backoff that honours Retry-After, and speaks plain
dicts to the rest of the controller."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import kubernetes.client as k8s
import urllib3
from kubernetes.client.exceptions import ApiException

from controller.kube import objects
from controller.kube.driver import DriverError, NodeInventory, ObservedWorkload, WorkloadSpec
from controller.kube.kubeconfig import RemoteAccess, canonical_server, parse_kubeconfig
from node_agent.cluster import handover, pods

log = logging.getLogger(__name__)
T = TypeVar("T")
FIELD_MANAGER = "edgefleet"


class KubeError(DriverError):
    status = 0
    transient_kind = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message, transient=self.transient_kind)
        self.retry_after_s = retry_after_s


class NotFound(KubeError):
    status = 404


class Conflict(KubeError):
    status = 409


class Invalid(KubeError):
    status = 422


class Unauthorized(KubeError):
    status = 401


class Forbidden(KubeError):
    status = 403


class TooManyRequests(KubeError):
    status = 429
    transient_kind = True


class ServerError(KubeError):
    status = 500
    transient_kind = True


class Unreachable(KubeError):
    transient_kind = True


_BY_STATUS: dict[int, type[KubeError]] = {
    400: Invalid,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Invalid,
    429: TooManyRequests,
}


def translate(exc: Exception) -> KubeError:
    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message = str(exc.reason or "")
        try:
            body = json.loads(exc.body or "{}")
            message = body.get("message") or message
        except (TypeError, ValueError):
            pass
        retry_after = None
        headers = exc.headers or {}
        if headers.get("Retry-After"):
            try:
                retry_after = float(headers["Retry-After"])
            except ValueError:
                retry_after = None
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else KubeError)
        return cls(f"{status} {message}", retry_after_s=retry_after)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return Unreachable(f"API server unreachable: {exc}")
    return KubeError(f"{type(exc).__name__}: {exc}")


def with_retries(fn: Callable[[], T], *, backoff: Sequence[float], what: str) -> T:
    """Call ``fn``; on a transient error wait (the backoff step, or Retry-After if the
    server asks for longer) and try again, once per backoff step."""
    for attempt in range(len(backoff) + 1):
        try:
            return fn()
        except Exception as exc:
            err = translate(exc)
            if not err.transient or attempt == len(backoff):
                raise err from exc
            wait = max(backoff[attempt], err.retry_after_s or 0.0)
            log.warning("%s: %s; retrying in %.1f s", what, err, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _private_file(content: str, suffix: str) -> str:
    """A file only this process's user may read (the client library wants paths)."""
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the client's lifetime
        "w", suffix=suffix, prefix="edgefleet-", delete=False
    )
    with handle:
        os.chmod(handle.name, 0o600)
        handle.write(content)
    return handle.name


def _configuration(server: str | None, credentials: Mapping[str, Any], timeout_s: float) -> Any:
    """A client configuration from inline credentials only. A kubeconfig is parsed by
    :func:`parse_kubeconfig` (which refuses exec plugins, auth providers and file paths)
    and never given to the library's own loader, which would run or read them."""
    if credentials.get("kubeconfig"):
        access = parse_kubeconfig(credentials["kubeconfig"])
    else:
        ca = credentials.get("caData")
        if ca and "BEGIN CERTIFICATE" not in ca:
            ca = base64.b64decode(ca).decode()
        access = RemoteAccess(
            server=server or "",
            ca_pem=ca or None,
            token=credentials["token"],
            insecure_skip_tls_verify=bool(credentials.get("insecureSkipTLSVerify")),
        )
    cfg = k8s.Configuration()
    # The host is rebuilt from its parsed parts: the allow-list checked these very parts.
    cfg.host = canonical_server(server or access.server)
    if access.token:
        cfg.api_key = {"authorization": access.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
    if access.client_cert_pem and access.client_key_pem:
        cfg.cert_file = _private_file(access.client_cert_pem, ".crt")
        cfg.key_file = _private_file(access.client_key_pem, ".key")
    if access.insecure_skip_tls_verify:
        cfg.verify_ssl = False
    elif access.ca_pem:
        cfg.ssl_ca_cert = _private_file(access.ca_pem, ".crt")
    if access.tls_server_name:
        cfg.tls_server_name = access.tls_server_name
    cfg.retries = False  # we retry ourselves, with our backoff and Retry-After
    return cfg


class KubernetesDriver:
    # Verbs the driver needs, checked at registration (the edge agent chart grants them).
    REQUIRED: tuple[tuple[str, str, str, str | None], ...] = (
        ("apps", "daemonsets", "create", None),
        ("apps", "daemonsets", "patch", None),
        ("apps", "daemonsets", "delete", None),
        ("apps", "daemonsets", "list", None),
        ("", "pods", "list", None),
        ("", "endpoints", "list", None),
        ("", "nodes", "list", None),
        ("", "nodes", "patch", None),
        ("", "services", "create", None),
        ("", "services", "patch", None),
        ("", "services", "delete", None),
        ("", "secrets", "create", None),
        ("", "secrets", "patch", objects.ARTIFACT_SECRET),
    )

    def __init__(
        self,
        cluster: str,
        *,
        server: str | None,
        namespace: str,
        credentials: Mapping[str, Any],
        image: str,
        port: int,
        timeout_s: float = 15.0,
        backoff: Sequence[float] = (0.2, 0.5, 1.0, 2.0),
        artifact_token: Callable[[], str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.artifact_token = artifact_token
        self._secret_token: str | None = None
        self._server_version: tuple[int, int] | None = None
        self.namespace = namespace
        self.image = image
        self.port = port
        self.timeout_s = timeout_s
        self.backoff = tuple(backoff)
        self._api = k8s.ApiClient(_configuration(server, credentials, timeout_s))
        self.core = k8s.CoreV1Api(self._api)
        self.apps = k8s.AppsV1Api(self._api)
        self.authz = k8s.AuthorizationV1Api(self._api)
        self.version_api = k8s.VersionApi(self._api)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    # -- plumbing

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout_s)
        return with_retries(
            lambda: fn(*args, **kwargs), backoff=self.backoff, what=f"{self.cluster}: {what}"
        )

    def _get_json(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        resp = self._call(what, fn, *args, _preload_content=False, **kwargs)
        return json.loads(resp.data)

    # -- ClusterDriver

    def check(self) -> None:
        """Connectivity, then every permission the driver needs, named if missing."""
        self._call("version", self.version_api.get_code)
        missing = []
        for group, resource, verb, name in self.REQUIRED:
            namespaced = resource != "nodes"
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "group": group,
                        "resource": resource,
                        "verb": verb,
                        **({"namespace": self.namespace} if namespaced else {}),
                        **({"name": name} if name else {}),
                    }
                },
            }
            result = self._get_json(
                "access review", self.authz.create_self_subject_access_review, review
            )
            if not result.get("status", {}).get("allowed"):
                scope = f" in namespace {self.namespace}" if namespaced else ""
                named = f" {name}" if name else ""
                missing.append(f"{verb} {resource}{'.' + group if group else ''}{named}{scope}")
        if not missing:
            self.ensure_namespace()
            # Every node sync (beat, every few minutes) keeps the artifact token fresh, so
            # a pod that starts long after the last rollout still gets a valid one.
            self.ensure_artifact_secret()
            return
        if missing:
            raise Forbidden(
                f"the controller's identity on cluster {self.cluster} lacks: {', '.join(missing)} "
                "(install the edgefleet-agent chart with rbac.create=true)"
            )

    def list_nodes(self) -> list[NodeInventory]:
        data = self._get_json("list nodes", self.core.list_node)
        out = []
        for item in data.get("items", []):
            # Read as the cluster agent reads them in pull mode: one reading, two modes.
            node = pods.node_report(item)
            out.append(
                NodeInventory(
                    name=node.name,
                    labels=node.labels,
                    architecture=node.architecture,
                    capacity=node.capacity,
                    allocatable=node.allocatable,
                    ready=node.ready,
                    runtimes=tuple(node.runtimes),
                )
            )
        return out

    def ensure_namespace(self) -> None:
        """Create the workload namespace if the identity may; with the edge chart's exact
        RBAC it may not, and the chart has created it already."""
        with contextlib.suppress(Conflict, Forbidden):
            self._call(
                "create namespace", self.core.create_namespace, objects.namespace(self.namespace)
            )

    def apply(self, model: str, desired: Mapping[str, WorkloadSpec | None]) -> None:
        """Server-side apply the model's Service and each version's DaemonSet, then label
        the nodes, make before break (see :mod:`controller.kube.objects`): a node moving
        to another version keeps the one that serves under its previous label until the
        new one is Ready and in the Service's Endpoints. Handovers of nodes not in
        ``desired`` are finished too; a DaemonSet no node selects any more is deleted,
        and the Service with the last one."""
        specs = {s.version: s for s in desired.values() if s is not None}
        if specs:
            self.ensure_artifact_secret()
            self.apply_service(model)
        for spec in specs.values():
            self.apply_daemonset(spec)
        labels = self._model_labels(model, handover.node_label(model))
        by_node = self._pods_by_node(model)
        routed = self._routed(model)
        for node in sorted(set(desired) | set(labels)):
            current, previous = labels.get(node, (None, None))
            wanted = current  # a node not in ``desired`` stays; its handover may finish
            if node in desired:
                wanted = w.version if (w := desired[node]) is not None else None
            labels[node] = self._set_labels(
                model, node, wanted, current, previous, by_node.get(node), routed
            )
        self.collect_garbage(model, labels)

    def _model_labels(self, model: str, selector: str) -> dict[str, tuple[str | None, str | None]]:
        """(label, previous label) of ``model`` per node that has ``selector``."""
        key, prev_key = handover.node_label(model), handover.previous_label(model)
        nodes = self._get_json("list labelled nodes", self.core.list_node, label_selector=selector)
        out = {}
        for item in nodes.get("items", []):
            labels = item["metadata"].get("labels") or {}
            out[item["metadata"]["name"]] = (labels.get(key), labels.get(prev_key))
        return out

    def _set_labels(
        self,
        model: str,
        node: str,
        wanted: str | None,
        current: str | None,
        previous: str | None,
        pods_on_node: Sequence[Mapping[str, Any]] | None,
        routed: frozenset[str],
    ) -> tuple[str | None, str | None]:
        """Patch ``node``'s labels of ``model`` to what :func:`handover.step` says, if
        they change; returns them."""
        after = handover.step(wanted, current, previous, pods_on_node or (), routed)
        if after != (current, previous):
            key, prev_key = handover.node_label(model), handover.previous_label(model)
            patch = {"metadata": {"labels": {key: after[0], prev_key: after[1]}}}
            self._call(
                f"label node {node}",
                self.core.patch_node,
                node,
                patch,
                _content_type="application/merge-patch+json",
            )
        return after

    def _node_local(self) -> bool:
        """Whether the API server knows ``internalTrafficPolicy`` (Kubernetes 1.22+, on by
        default from then); asked once per client."""
        if self._server_version is None:
            info = self._get_json("version", self.version_api.get_code)
            major = int("".join(c for c in str(info.get("major", "1")) if c.isdigit()) or 1)
            minor = int("".join(c for c in str(info.get("minor", "0")) if c.isdigit()) or 0)
            self._server_version = (major, minor)
            if self._server_version < (1, 22):
                log.warning(
                    "%s: Kubernetes %d.%d has no internalTrafficPolicy: the models' Services "
                    "are cluster-wide there, not node-local",
                    self.cluster,
                    major,
                    minor,
                )
        return self._server_version >= (1, 22)

    def apply_service(self, model: str) -> None:
        body = objects.service(
            model, namespace=self.namespace, port=self.port, node_local=self._node_local()
        )
        self._apply_unforced("service", self.core.patch_namespaced_service, body)

    def ensure_artifact_secret(self) -> None:
        """The Secret with the cluster's current artifact token. The token changes about
        twice per lifetime (see mint_artifact_token), so this writes about as often; the
        last token written is remembered to spare the call in between."""
        if self.artifact_token is None:
            return
        token = self.artifact_token()
        if token == self._secret_token:
            return
        self._call(
            "apply artifact secret",
            self.core.patch_namespaced_secret,
            objects.ARTIFACT_SECRET,
            self.namespace,
            objects.artifact_secret(self.namespace, token),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        self._secret_token = token

    def apply_daemonset(self, spec: WorkloadSpec) -> None:
        body = objects.daemonset(spec, namespace=self.namespace, image=self.image, port=self.port)
        self._apply_unforced("daemonset", self.apps.patch_namespaced_daemon_set, body)

    def _apply_unforced(self, kind: str, patch: Callable[..., Any], body: dict[str, Any]) -> None:
        """Server-side apply of ``body`` as edgefleet's field manager, never forcing a
        field another manager owns: such a conflict is reported, naming the object."""
        name = body["metadata"]["name"]
        try:
            self._call(
                f"apply {kind} {name}",
                patch,
                name,
                self.namespace,
                body,
                field_manager=FIELD_MANAGER,
                force=False,
                _content_type="application/apply-patch+yaml",
            )
        except Conflict as exc:
            raise Conflict(
                f"{kind} {self.namespace}/{name} has fields owned by another manager "
                f"(someone edited it with kubectl?): {exc}; edgefleet does not force them"
            ) from exc

    def collect_garbage(
        self, model: str, labels: Mapping[str, tuple[str | None, str | None]] | None = None
    ) -> list[str]:
        """Delete the DaemonSets of versions no node names (in its label or its previous
        label: ``labels``, read if not given), and the Service when none is left."""
        if labels is None:
            labels = self._model_labels(model, handover.node_label(model))
        used = {v for pair in labels.values() for v in pair if v}
        sets = self._get_json(
            "list daemonsets",
            self.apps.list_namespaced_daemon_set,
            self.namespace,
            label_selector=f"app.kubernetes.io/name={objects.APP_NAME},edgefleet.io/model={model}",
        )
        deleted = []
        for ds in sets.get("items", []):
            version = ds["metadata"]["labels"].get("edgefleet.io/version")
            if version not in used:
                name = ds["metadata"]["name"]
                with contextlib.suppress(NotFound):  # already gone
                    self._call(
                        f"delete daemonset {name}",
                        self.apps.delete_namespaced_daemon_set,
                        name,
                        self.namespace,
                        propagation_policy="Foreground",
                    )
                deleted.append(name)
        if not used:
            with contextlib.suppress(NotFound):
                self._call(
                    "delete service",
                    self.core.delete_namespaced_service,
                    objects.service_name(model),
                    self.namespace,
                    _preload_content=False,  # (the answer is a Status the client misreads)
                )
        return deleted

    def _pods_by_node(self, model: str) -> dict[str, list[dict[str, Any]]]:
        """The model's pods that are not being deleted, per node, oldest first."""
        listed = self._get_json(
            "list pods",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"app.kubernetes.io/name={objects.APP_NAME},edgefleet.io/model={model}",
        )
        out: dict[str, list[dict[str, Any]]] = {}
        items = sorted(
            listed.get("items", []), key=lambda p: p["metadata"].get("creationTimestamp") or ""
        )
        for pod in items:
            # A DaemonSet pod not scheduled yet names its node in its node affinity.
            node = pods.pod_node(pod)
            if node and pod["metadata"].get("deletionTimestamp") is None:
                out.setdefault(node, []).append(pod)
        return out

    def _routed(self, model: str) -> frozenset[str]:
        """The pods of ``model`` its Service sends traffic to (listed after the pods: a
        pod serves when both show it so). The endpoints controller gives the Endpoints
        their Service's labels."""
        listed = self._get_json(
            "list endpoints",
            self.core.list_namespaced_endpoints,
            self.namespace,
            label_selector=f"app.kubernetes.io/name={objects.APP_NAME},edgefleet.io/model={model}",
        )
        return handover.routed_pods(listed.get("items", []))

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]:
        """What each node runs of ``model``. A node in a handover reports the version it
        moves to (Absent, Pending, Running, then Ready), never the one that serves until
        then; and the handover finishes here, in the call that sees the new one Ready
        and in the Service's Endpoints."""
        by_node = self._pods_by_node(model)
        moving = self._model_labels(model, handover.previous_label(model))
        routed = self._routed(model) if moving else frozenset()
        for node, (current, previous) in moving.items():
            moving[node] = self._set_labels(
                model, node, current, current, previous, by_node.get(node), routed
            )
        if any(after[1] is None for after in moving.values()):
            self.collect_garbage(model)  # a version may have left its last node
        out: dict[str, ObservedWorkload] = {}
        for node in nodes:
            found = by_node.get(node, [])
            if node in moving:
                found = [
                    p
                    for p in found
                    if (p["metadata"].get("labels") or {}).get("edgefleet.io/version")
                    == moving[node][0]
                ]
            # Otherwise the newest pod: an old one may linger a moment after its handover.
            out[node] = _observe_pod(found[-1]) if found else ObservedWorkload("Absent")
        return out

    def workloads(self, model: str) -> list[dict[str, Any]]:
        data = self._get_json(
            "list daemonsets",
            self.apps.list_namespaced_daemon_set,
            self.namespace,
            label_selector=f"app.kubernetes.io/name={objects.APP_NAME},edgefleet.io/model={model}",
        )
        items: list[dict[str, Any]] = data.get("items", [])
        return items


def _observe_pod(pod: Mapping[str, Any]) -> ObservedWorkload:
    """One pod's state, read as the cluster agent reads it in pull mode
    (node_agent/cluster/pods.py), so both modes judge a pod alike."""
    seen = pods.observe_pod(pod)
    if seen is None:  # being deleted, or of no node
        return ObservedWorkload("Absent")
    return ObservedWorkload(seen.phase, seen.version, seen.sha256, seen.reason, seen.restarts)


_drivers: dict[tuple[str, str], KubernetesDriver] = {}
_lock = threading.Lock()


def cached_driver(key: tuple[str, str], make: Callable[[], KubernetesDriver]) -> KubernetesDriver:
    """One client per (cluster, credentials fingerprint): connection pools are reused
    across reconcile steps, and new credentials get a new client."""
    with _lock:
        driver = _drivers.get(key)
        if driver is None:
            driver = _drivers[key] = make()
        return driver
