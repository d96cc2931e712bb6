"""A test driver: the simulated driver with failures and hooks injected per cluster,
installed where the controller builds its drivers (``install``). Everything above the
driver (the reconciler, drift repair) runs the product's own code."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from controller.fleet import service as fleet_service
from controller.kube.driver import (
    ClusterDriver,
    DriverError,
    NodeInventory,
    ObservedWorkload,
    WorkloadSpec,
)
from controller.kube.factory import driver_for as real_driver_for


@dataclass
class Faults:
    """What the clusters do wrong, per cluster name (set and cleared by the tests)."""

    apply: dict[str, DriverError] = field(default_factory=dict)
    observe: dict[str, DriverError] = field(default_factory=dict)
    stuck: set[str] = field(default_factory=set)  # nodes whose workload never gets Ready
    failing: dict[str, str] = field(default_factory=dict)  # node -> why its workload fails
    calls: list[tuple[str, str]] = field(default_factory=list)  # (cluster, "apply"|"observe")
    # Called with (cluster, "apply"|"observe") before every call: to block or count.
    hook: Callable[[str, str], None] | None = None


class FaultyDriver:
    def __init__(self, cluster: str, inner: ClusterDriver, faults: Faults) -> None:
        self.cluster, self.inner, self.faults = cluster, inner, faults

    def _call(self, what: str) -> None:
        self.faults.calls.append((self.cluster, what))
        if self.faults.hook is not None:
            self.faults.hook(self.cluster, what)
        error = getattr(self.faults, what).get(self.cluster)
        if error is not None:
            raise error

    def check(self) -> None:
        self.inner.check()

    def list_nodes(self) -> list[NodeInventory]:
        return self.inner.list_nodes()

    def apply(self, model: str, desired: Mapping[str, WorkloadSpec | None]) -> None:
        self._call("apply")
        self.inner.apply(model, desired)

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]:
        self._call("observe")
        seen = self.inner.observe(model, nodes)
        return {n: self._seen(n, o) for n, o in seen.items()}

    def _seen(self, node: str, seen: ObservedWorkload) -> ObservedWorkload:
        if seen.phase == "Absent":
            return seen
        if node in self.faults.stuck:
            return ObservedWorkload("Pending", reason="ContainerCreating")
        if node in self.faults.failing:
            return replace(seen, phase="Failed", reason=self.faults.failing[node])
        return seen


def install(monkeypatch: pytest.MonkeyPatch) -> Faults:
    """Every driver this process builds from now on is a FaultyDriver sharing one Faults."""
    found = Faults()

    def driver_for(name: str, driver: str, *args: Any, **kwargs: Any) -> ClusterDriver:
        return FaultyDriver(name, real_driver_for(name, driver, *args, **kwargs), found)

    monkeypatch.setattr(fleet_service, "driver_for", driver_for)
    return found


def transient(message: str = "503 from the API server") -> DriverError:
    return DriverError(message, transient=True)


def permanent(message: str = "403 forbidden") -> DriverError:
    return DriverError(message, transient=False)
