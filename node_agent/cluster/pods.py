"""How a node and an inference pod read, from their API objects: a node's inventory
entry, a pod's state (readiness, Unschedulable, OOMKilled, ImagePullBackOff, restarts).
The cluster agent reports them in pull mode, and the push driver
(controller/kube/client.py) reads pods and nodes with these same functions, so a rollout
judges a pod alike in both modes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node_agent.cluster.contract import (
    NODE_LABEL_PREFIX,
    PREVIOUS_LABEL_PREFIX,
    NodeReport,
    Phase,
    WorkloadObservation,
)

FAILING_WAITS = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "InvalidImageName",
        "CreateContainerError",
    }
)


def node_report(item: Mapping[str, Any]) -> NodeReport:
    meta, status = item.get("metadata") or {}, item.get("status") or {}
    labels = meta.get("labels") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    runtimes = labels.get("edgefleet.io/runtimes")
    return NodeReport(
        name=meta["name"],
        # The model labels are the desired state's, not the node's own.
        labels={
            k: v
            for k, v in labels.items()
            if not k.startswith((NODE_LABEL_PREFIX, PREVIOUS_LABEL_PREFIX))
        },
        architecture=(status.get("nodeInfo") or {}).get("architecture")
        or labels.get("kubernetes.io/arch"),
        capacity=_cpu_memory(status.get("capacity") or {}),
        allocatable=_cpu_memory(status.get("allocatable") or {}),
        ready=ready,
        runtimes=runtimes.split(".") if runtimes else ["onnx", "tflite"],
    )


def _cpu_memory(resources: Mapping[str, str]) -> dict[str, str]:
    return {k: str(resources[k]) for k in ("cpu", "memory") if k in resources}


def pod_node(pod: Mapping[str, Any]) -> str | None:
    """The node of a pod; for a DaemonSet pod not scheduled yet, the node its node
    affinity names."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    terms = (affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get(
        "nodeSelectorTerms"
    ) or []
    for term in terms:
        for field in term.get("matchFields") or []:
            if field.get("key") == "metadata.name" and field.get("values"):
                return str(field["values"][0])
    return None


def observe_pod(pod: Mapping[str, Any]) -> WorkloadObservation | None:
    """The state of one inference pod, or None for a pod being deleted or of no node."""
    meta = pod.get("metadata") or {}
    node = pod_node(pod)
    labels = meta.get("labels") or {}
    model = labels.get("edgefleet.io/model")
    if meta.get("deletionTimestamp") is not None or node is None or not model:
        return None
    version = labels.get("edgefleet.io/version")
    sha = (meta.get("annotations") or {}).get("edgefleet.io/sha256")

    def seen(phase: Phase, reason: str | None = None) -> WorkloadObservation:
        return WorkloadObservation(
            model=model,
            node=node,
            phase=phase,
            version=version,
            sha256=sha,
            reason=reason[:1000] if reason else None,
            restarts=restarts,
        )

    status = pod.get("status") or {}
    restarts = 0
    for cs in status.get("containerStatuses") or []:
        restarts += int(cs.get("restartCount", 0))
        state = cs.get("state") or {}
        terminated = (cs.get("lastState") or {}).get("terminated") or state.get("terminated")
        # An OOM-killed container crash-loops; the kill is the cause worth reporting.
        if terminated and terminated.get("reason") == "OOMKilled":
            return seen("Failed", "OOMKilled")
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FAILING_WAITS:
            return seen("Failed", waiting["reason"])
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            reason = cond.get("reason") or "Unschedulable"
            return seen("Failed", f"{reason}: {cond.get('message', '')}")
    if status.get("phase") == "Failed":
        return seen("Failed", status.get("reason") or "PodFailed")
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if ready:
        return seen("Ready")
    return seen("Running" if status.get("phase") == "Running" else "Pending")
