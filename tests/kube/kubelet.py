"""More of the kubelet stand-in: what a kubelet does when pods are deleted."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s

from tests.kube.controlplane import mark_pods_ready

_ips = (f"10.244.{i // 250}.{i % 250 + 2}" for i in itertools.count())


def finalize_terminating_pods(core: Any, namespace: str) -> int:
    """A kubelet confirms a pod's graceful deletion; with none, nobody would."""
    n = 0
    for pod in core.list_namespaced_pod(namespace).items:
        if pod.metadata.deletion_timestamp is not None:
            core.delete_namespaced_pod(
                pod.metadata.name, namespace, body=k8s.V1DeleteOptions(grace_period_seconds=0)
            )
            n += 1
    return n


def settle(core: Any, namespace: str) -> None:
    """One kubelet beat: start what was scheduled, finish what was deleted, with no pod
    IPs (a test that gives its own): the endpoints controller lists none of these pods,
    so no handover finishes (see :func:`start_pods`)."""
    mark_pods_ready(core, namespace, "app.kubernetes.io/name=edgefleet-inference")
    finalize_terminating_pods(core, namespace)


def start_pods(core: Any, ns: str) -> None:
    """The kubelet starting the pods bound to its node: an IP each (the endpoints
    controller lists pods by IP), then Running and Ready, never before the IP (a pod
    scheduled meanwhile waits for the next beat: Ready without an IP, it would count as
    serving while the Service could not reach it); and finishing deleted ones."""
    for pod in core.list_namespaced_pod(ns).items:
        if pod.spec.node_name and not pod.status.pod_ip and not pod.metadata.deletion_timestamp:
            ip = next(_ips)
            core.patch_namespaced_pod_status(
                pod.metadata.name, ns, {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}
            )
    mark_pods_ready(core, ns, "app.kubernetes.io/name=edgefleet-inference", with_ip_only=True)
    finalize_terminating_pods(core, ns)


def eventually(
    check: Callable[[], Any],
    *,
    timeout_s: float = 30,
    what: str,
    beat: Callable[[], object] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if beat is not None:
            beat()
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")
