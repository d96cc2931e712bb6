"""The Kubernetes objects edgefleet creates, as plain dicts (no client library here, so
they are easy to read, test and validate against the official schemas).

One DaemonSet per (model, version), selecting nodes by the label
``model.edgefleet.io/<model>=<version>`` that the driver sets on each node. Why a
DaemonSet keyed by a node label rather than Deployments:
- pinning is exact: a node runs the version its label names, nothing else, and moving a
  node between versions is one label patch;
- it scales: one object per version, whatever the node count (10,000 pinned single-replica
  Deployments would be 10,000 objects and 10,000 ReplicaSets per model);
- the kubelet's own DaemonSet semantics fit an edge node: the pod comes back after a node
  reboot with no scheduler round trip beyond the node's own.

**Make before break.** A version change must not interrupt the applications on the node
that call the model. Of the two ways (one long-lived pod per (model, node) whose server
hot-swaps on instruction, or surge pods behind a node-local Service), edgefleet surges:

- while a node moves from A to B it carries two labels, ``model.edgefleet.io/<model>=B``
  (what it should run) and ``previous.model.edgefleet.io/<model>=A`` (what serves until B
  is Ready); each version's DaemonSet selects nodes whose label *or* previous label names
  it, so B's pod starts beside A's, downloads into the node cache and warms up;
- applications call the model's Service (:func:`service`, ``internalTrafficPolicy:
  Local``: the node's own pods only), which sends traffic to Ready pods only, so traffic
  moves when B turns Ready, by the kubelet's readiness probe, with no controller round trip;
- the driver removes the previous label once it sees B Ready and in the Service's
  Endpoints, which kube-proxy routes by (``apply`` and ``observe`` both finish
  handovers; in pull mode the cluster agent does, at its next look at the pods and
  Endpoints: the rule is node_agent/cluster/handover.py, one copy for both), and A's pod
  drains: it keeps accepting for ``SHUTDOWN_DELAY_S`` while kube-proxy catches up,
  answers every request with ``Connection: close`` so clients reconnect to B, and lets
  requests in flight finish.

Rollback is the same handover backwards. Why surge rather than a hot swap: the desired
state stays declarative and per node (a DaemonSet's pod template is the same on every
node, so a per-model pod would have to learn its node's version from somewhere, and a
restarted one would serve the wrong version until told again; here a restarted pod comes
back on its node's version), the inference pod gets no API credentials and the agent no
new role, a push and a pull cluster apply the same objects, and the overlap is visible
in the API (two pods) rather than inside a process. The cost: for the overlap (the new
version's download, load and warm-up) the node holds both pods, so it needs room for both
pods' requests; the driver falls back to break before make where the scheduler says it
has none (``Unschedulable`` beside a serving old pod). Not covered: a change of the pod
template of one version (a new ``edgefleet-serve`` image) is the DaemonSet's own rolling
update, maxUnavailable 1 (``maxSurge`` would make it surge too, from Kubernetes 1.25;
older API servers refuse the field)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from controller.kube.driver import WorkloadSpec
from node_agent.cluster.handover import node_label, previous_label

MANAGED_BY = "edgefleet"
APP_NAME = "edgefleet-inference"
CACHE_DIR = "/var/lib/edgefleet/models"
RUN_AS = 10001  # the inference image's user (docker/inference.Dockerfile)
# The Secret holding the cluster's artifact token, which inference pods read at start
# (env from the Secret: a refreshed token reaches new pods without touching the
# DaemonSets, so no running pod restarts for it).
ARTIFACT_SECRET = "edgefleet-artifact-token"
ARTIFACT_TOKEN_ENV = "EDGEFLEET_SERVE_ARTIFACT_TOKEN"
# How long a pod being replaced keeps accepting after SIGTERM: kube-proxy on its node
# drops it from the Service within about a second (the EndpointSlice update); five covers a
# busy node. Then requests in flight get SHUTDOWN_GRACE_S; the kubelet's grace period
# covers both with room to spare.
SHUTDOWN_DELAY_S = 5
SHUTDOWN_DELAY_ENV = "EDGEFLEET_SERVE_SHUTDOWN_DELAY_S"
SHUTDOWN_GRACE_ENV = "EDGEFLEET_SERVE_SHUTDOWN_GRACE_S"
SHUTDOWN_GRACE_S = 20
TERMINATION_GRACE_S = 30


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


def workload_name(model: str, version: str) -> str:
    """A DNS-1123 label of at most 63 characters, unique per (model, version)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", version.lower()).strip("-")
    digest = hashlib.sha256(f"{model}\x00{version}".encode()).hexdigest()[:6]
    base = f"ef-{model}-{slug}"[: 63 - 7].rstrip("-")
    return f"{base}-{digest}"


def model_selector(model: str) -> dict[str, str]:
    """Every inference pod of ``model``, whatever its version (the Service's selector)."""
    return {"app.kubernetes.io/name": APP_NAME, "edgefleet.io/model": model}


def selector_labels(model: str, version: str) -> dict[str, str]:
    return {**model_selector(model), "edgefleet.io/version": version}


def service_name(model: str) -> str:
    """The model's Service: a DNS-1035 label (starts with a letter) of at most 63."""
    name = f"ef-{model}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"{name[:56].rstrip('-')}-{digest}"


def service(model: str, *, namespace: str, port: int, node_local: bool = True) -> dict[str, Any]:
    """The stable endpoint of ``model`` for applications: every version's pods, Ready ones
    only (the endpoints controller's rule), and with ``node_local`` only those of the
    caller's own node (``internalTrafficPolicy: Local``, Kubernetes 1.22 and later; the
    driver leaves it out for an older API server, which would refuse the field)."""
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "selector": model_selector(model),
        "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
    }
    if node_local:
        spec["internalTrafficPolicy"] = "Local"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(model),
            "namespace": namespace,
            "labels": {
                **model_selector(model),
                "app.kubernetes.io/component": "inference",
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "spec": spec,
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
            # The rollout that applied it last: on the DaemonSet only. In the pod template
            # it would make a rollback (another rollout re-applying the version that
            # serves) a change of template, and the DaemonSet would replace the very pods
            # the rollback keeps (a real kubelet showed it: test_real_node_rollout.py).
            "labels": {**labels, "edgefleet.io/rollout": spec.rollout},
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
                    # The node's label or, during a handover, its previous label.
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": key, "operator": "In", "values": [spec.version]}
                                        ]
                                    }
                                    for key in (node_label(spec.model), previous_label(spec.model))
                                ]
                            }
                        }
                    },
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
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
                                *(
                                    [
                                        "--warmup-inputs",
                                        json.dumps(spec.warmup_inputs, sort_keys=True),
                                    ]
                                    if spec.warmup_inputs
                                    else []
                                ),
                            ],
                            "env": [
                                {
                                    "name": ARTIFACT_TOKEN_ENV,
                                    "valueFrom": {
                                        "secretKeyRef": {"name": ARTIFACT_SECRET, "key": "token"}
                                    },
                                },
                                {"name": SHUTDOWN_DELAY_ENV, "value": str(SHUTDOWN_DELAY_S)},
                                {"name": SHUTDOWN_GRACE_ENV, "value": str(SHUTDOWN_GRACE_S)},
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
