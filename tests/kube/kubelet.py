"""More of the kubelet stand-in: what a kubelet does when pods are deleted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s

from tests.kube.controlplane import mark_pods_ready


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
    """One kubelet beat: start what was scheduled, finish what was deleted."""
    mark_pods_ready(core, namespace, "app.kubernetes.io/name=edgefleet-inference")
    finalize_terminating_pods(core, namespace)


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
