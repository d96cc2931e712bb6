"""How the controller reaches clusters: one interface, chosen per cluster.

A driver makes a cluster's workloads match what the controller wants per node and model
(``apply``), reports what is really running (``observe``), and lists the cluster's
nodes (``list_nodes``). Every call is idempotent: the reconciler is level-triggered and
repeats calls after a crash without harm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class WorkloadSpec:
    """One model version's inference workload on a node."""

    model: str
    version: str
    sha256: str
    format: str
    artifact_url: str
    rollout: str
    resources: Mapping[str, Any] = field(default_factory=dict)
    # The version's validation hints: edgefleet-serve warms up on inputs they size.
    warmup_inputs: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "sha256": self.sha256,
            "format": self.format,
            "artifact_url": self.artifact_url,
            "rollout": self.rollout,
            "resources": dict(self.resources),
            "warmup_inputs": dict(self.warmup_inputs),
        }


@dataclass(frozen=True)
class ObservedWorkload:
    """``phase``: Absent, Pending, Running, Ready or Failed (``reason`` says why)."""

    phase: str
    version: str | None = None
    sha256: str | None = None
    reason: str | None = None
    restarts: int = 0


@dataclass(frozen=True)
class NodeInventory:
    name: str
    labels: Mapping[str, str]
    architecture: str | None
    capacity: Mapping[str, str]
    allocatable: Mapping[str, str]
    ready: bool
    runtimes: Sequence[str] = ("onnx", "tflite")


class DriverError(Exception):
    """A cluster call failed. ``transient`` errors are retried by the next reconcile;
    permanent ones fail the nodes involved."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class ClusterDriver(Protocol):
    def check(self) -> None: ...

    def list_nodes(self) -> list[NodeInventory]: ...

    def apply(self, model: str, desired: Mapping[str, WorkloadSpec | None]) -> None: ...

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]: ...
