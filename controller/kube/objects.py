"""The Kubernetes objects edgefleet creates, as plain dicts (no client library here, so
they are easy to read, test and validate against the official schemas).

One DaemonSet per (model, version), selecting nodes by the label
``model.edgefleet.io/<model>=<version>`` that the driver sets on each node. Why a
DaemonSet keyed by a node label rather than Deployments:
- pinning is exact: a node runs the version its label names, nothing else, and moving a
  node between versions is one label patch (old pod goes, new pod comes);
- it scales: one object per version, whatever the node count (10,000 pinned single-replica
  Deployments would be 10,000 objects and 10,000 ReplicaSets per model);
- the kubelet's own DaemonSet semantics fit an edge node: the pod comes back after a node
  reboot with no scheduler round trip beyond the node's own."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from controller.kube.driver import WorkloadSpec

NODE_LABEL_PREFIX = "model.edgefleet.io/"
MANAGED_BY = "edgefleet"
APP_NAME = "edgefleet-inference"
CACHE_DIR = "/var/lib/edgefleet/models"
RUN_AS = 10001  # the inference image's user (docker/inference.Dockerfile)
# The Secret holding the cluster's artifact token, which inference pods read at start
# (env from the Secret: a refreshed token reaches new pods without touching the
# DaemonSets, so no running pod restarts for it).
ARTIFACT_SECRET = "edgefleet-artifact-token"
ARTIFACT_TOKEN_ENV = "EDGEFLEET_SERVE_ARTIFACT_TOKEN"


def artifact_secret(namespace: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": ARTIFACT_SECRET,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "type": "Opaque",
        "stringData": {"token": token},
    }


def node_label(model: str) -> str:
    return f"{NODE_LABEL_PREFIX}{model}"


def workload_name(model: str, version: str) -> str:
    """A DNS-1123 label of at most 63 characters, unique per (model, version)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", version.lower()).strip("-")
    digest = hashlib.sha256(f"{model}\x00{version}".encode()).hexdigest()[:6]
    base = f"ef-{model}-{slug}"[: 63 - 7].rstrip("-")
    return f"{base}-{digest}"


def selector_labels(model: str, version: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_NAME,
        "edgefleet.io/model": model,
        "edgefleet.io/version": version,
    }


def namespace(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
    }


def daemonset(
    spec: WorkloadSpec,
    *,
    namespace: str,
    image: str,
    port: int,
    tolerations: Sequence[Mapping[str, Any]] = ({"operator": "Exists", "effect": "NoSchedule"},),
) -> dict[str, Any]:
    name = workload_name(spec.model, spec.version)
    selector = selector_labels(spec.model, spec.version)
    labels = {
        **selector,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/version": spec.version,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "edgefleet.io/rollout": spec.rollout,
    }
    annotations = {
        "edgefleet.io/sha256": spec.sha256,
        "edgefleet.io/artifact-url": spec.artifact_url,
    }
    resources = {k: {rk: str(rv) for rk, rv in v.items()} for k, v in spec.resources.items() if v}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        **annotations,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "nodeSelector": {node_label(spec.model): spec.version},
                    "tolerations": [dict(t) for t in tolerations],
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": [_cache_owner(image, resources)],
                    "containers": [
                        {
                            "name": "inference",
                            "image": image,
                            "args": [
                                "--model-url",
                                spec.artifact_url,
                                "--sha256",
                                spec.sha256,
                                "--format",
                                spec.format,
                                "--model-name",
                                spec.model,
                                "--model-version",
                                spec.version,
                                "--cache-dir",
                                CACHE_DIR,
                                "--port",
                                str(port),
                            ],
                            "env": [
                                {
                                    "name": ARTIFACT_TOKEN_ENV,
                                    "valueFrom": {
                                        "secretKeyRef": {"name": ARTIFACT_SECRET, "key": "token"}
                                    },
                                },
                                {
                                    "name": "NODE_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                                },
                                {
                                    "name": "EDGEFLEET_CPU_LIMIT",
                                    "valueFrom": {
                                        "resourceFieldRef": {
                                            "containerName": "inference",
                                            "resource": "limits.cpu",
                                            "divisor": "1m",
                                        }
                                    },
                                },
                            ],
                            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                            "resources": resources,
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "http"},
                                "periodSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "initialDelaySeconds": 30,
                                "periodSeconds": 10,
                                "failureThreshold": 6,
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "model-cache", "mountPath": CACHE_DIR},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        # Node-local, content-addressed model cache: a restart while the
                        # node is offline still serves the verified artifact.
                        {
                            "name": "model-cache",
                            "hostPath": {"path": CACHE_DIR, "type": "DirectoryOrCreate"},
                        },
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def _cache_owner(image: str, resources: Mapping[str, Any]) -> dict[str, Any]:
    """The kubelet creates a missing hostPath directory owned by root (0755), and fsGroup
    does not apply to hostPath: on a node where no pod made the cache yet, the server (uid
    10001) could not write its first download (PermissionError, crash loop; a real kubelet
    showed it, tests/kube/test_real_node.py). This hands the directory to the server's uid,
    once: root, but with no capability except CHOWN, no privilege escalation, a read-only
    root; like the agent chart's init container of the same name."""
    owner = f"{RUN_AS}:{RUN_AS}"
    return {
        "name": "model-cache-owner",
        "image": image,
        "command": [
            "sh",
            "-c",
            f'[ "$(stat -c %u:%g {CACHE_DIR})" = "{owner}" ] || chown {owner} {CACHE_DIR}',
        ],
        "resources": dict(resources),
        "securityContext": {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_DIR}],
    }
