"""Apply rendered chart objects to a real API server and delete them again, as
``helm install`` / ``helm uninstall`` would for the kinds the agent chart uses."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kubernetes import client as k8s

# Creation order: what others refer to first.
ORDER = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@contextmanager
def applied(api: Any, objs: Sequence[dict[str, Any]]) -> Iterator[None]:
    """Create ``objs`` (of the kinds in ORDER) with ``api`` (an ApiClient); delete them,
    newest first, on exit."""
    dynamic: Any = k8s.CustomObjectsApi(api)
    core: Any = k8s.CoreV1Api(api)
    created: list[tuple[dict[str, Any], str]] = []
    try:
        for obj in sorted(objs, key=lambda o: ORDER.index(o["kind"])):
            group, _, version = obj["apiVersion"].rpartition("/")
            plural = obj["kind"].lower() + "s"
            namespace = obj["metadata"].get("namespace")
            if obj["kind"] == "Namespace":
                core.create_namespace(obj)
            elif obj["kind"] == "ServiceAccount":
                core.create_namespaced_service_account(namespace, obj)
            elif namespace:
                dynamic.create_namespaced_custom_object(group, version, namespace, plural, obj)
            else:
                dynamic.create_cluster_custom_object(group, version, plural, obj)
            created.append((obj, plural))
        yield
    finally:
        for obj, plural in reversed(created):
            group, _, version = obj["apiVersion"].rpartition("/")
            name, namespace = obj["metadata"]["name"], obj["metadata"].get("namespace")
            if obj["kind"] == "Namespace":
                core.delete_namespace(name)
            elif obj["kind"] == "ServiceAccount":
                core.delete_namespaced_service_account(name, namespace)
            elif namespace:
                dynamic.delete_namespaced_custom_object(group, version, namespace, plural, name)
            else:
                dynamic.delete_cluster_custom_object(group, version, plural, name)
