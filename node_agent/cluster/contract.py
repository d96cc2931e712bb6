"""The wire contract of pull mode, between the cluster agent and the controller. Both
import this module; nothing else defines these shapes.

The controller answers ``GET /v1/clusters/{name}/pull/desired?since=R`` with the whole
desired state of the cluster (a cluster's objects are few: one DaemonSet per model
version in use and one label per node and model), so applying it is level-triggered
like the push driver: the agent makes the cluster match it and can repeat that at any
time, from its copy on disk, with the controller gone. The revision is the resume
token: the request waits until the cluster's revision differs from ``since``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds of one report (an edge cluster is tens of nodes; these leave room).
MAX_NODES = 5_000
MAX_WORKLOADS = 20_000
MAX_LABELS = 256

# The label every inference object carries (controller/kube/objects.py); the agent
# deletes DaemonSets and Services with it that the desired state no longer names.
INFERENCE_SELECTOR = "app.kubernetes.io/name=edgefleet-inference"
NODE_LABEL_PREFIX = "model.edgefleet.io/"
# A node in a handover also carries the version it moves from (controller/kube/objects.py).
PREVIOUS_LABEL_PREFIX = "previous.model.edgefleet.io/"

Phase = Literal["Absent", "Pending", "Running", "Ready", "Failed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DesiredState(_Strict):
    """What a pull cluster should run. ``changed`` false: the long poll timed out with
    the revision unchanged, and ``daemonsets``, ``services`` and ``node_labels`` are
    empty (keep the last ones); ``secret`` is sent every time (its artifact token is
    renewed on a clock, not with the revision)."""

    cluster: str
    revision: int = Field(ge=0)
    changed: bool
    namespace: str
    secret: dict[str, Any] = Field(description="the artifact-token Secret, to apply")
    daemonsets: list[dict[str, Any]] = Field(
        default_factory=list, description="every inference DaemonSet the cluster should have"
    )
    services: list[dict[str, Any]] = Field(
        default_factory=list,
        description="each model's node-local Service (the applications' stable endpoint)",
    )
    node_labels: dict[str, dict[str, str | None]] = Field(
        default_factory=dict,
        description="per node, model label -> the version it should run (None: none); "
        "the agent moves nodes there make before break (node_agent/cluster/handover.py)",
    )
    poll_timeout_s: float = Field(gt=0, description="how long the controller holds a poll")


class NodeReport(_Strict):
    """One node of the cluster's inventory, as the cluster's API server lists it."""

    name: str = Field(min_length=1, max_length=253)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    architecture: str | None = Field(None, max_length=32)
    capacity: dict[str, str] = Field(default_factory=dict, max_length=8)
    allocatable: dict[str, str] = Field(default_factory=dict, max_length=8)
    ready: bool
    runtimes: list[str] = Field(default_factory=lambda: ["onnx", "tflite"], max_length=8)


class WorkloadObservation(_Strict):
    """One inference pod as the cluster agent sees it (the push driver's ObservedWorkload)."""

    model: str = Field(min_length=1, max_length=63)
    node: str = Field(min_length=1, max_length=253)
    phase: Phase
    version: str | None = Field(None, max_length=128)
    sha256: str | None = Field(None, max_length=64)
    reason: str | None = Field(None, max_length=1000)
    restarts: int = Field(0, ge=0)


class ObservedReport(_Strict):
    """``POST /v1/clusters/{name}/pull/observed``: the cluster's nodes, its inference
    pods, the revision the agent has applied and the error of its last apply, if any."""

    applied_revision: int | None = Field(None, ge=0)
    nodes: list[NodeReport] = Field(max_length=MAX_NODES)
    workloads: list[WorkloadObservation] = Field(default_factory=list, max_length=MAX_WORKLOADS)
    apply_error: str | None = Field(None, max_length=2000)


class ReportAck(_Strict):
    revision: int = Field(description="the cluster's current desired revision")


class ClusterEnrollIn(_Strict):
    join_token: str = Field(min_length=1, max_length=512)


class ClusterEnrollOut(_Strict):
    """The credential is shown here once; the controller keeps only its sha256."""

    cluster: str
    credential: str
    poll_timeout_s: float
