"""The pull driver: a cluster the controller cannot reach, driven through the database.

In pull mode the cluster's own agent (``edgefleet-agent cluster``, node_agent/cluster/)
dials out to the controller, fetches the desired state, applies it with its in-cluster
identity and reports what it observes. The driver is the controller's half of that
exchange and keeps the ClusterDriver contract, so the rollout engine, node sync and drift
repair do not know which mode a cluster is in:

- ``apply`` stores the desired workload per (cluster, model, node) in ``pull_desired``
  and bumps the cluster's revision, the resume token of the agent's long poll. It writes
  in the caller's session, so the desired state becomes visible to the agent exactly when
  the reconcile step that decided it commits ("rows first, actions second"); a step that
  rolls back published nothing. Unchanged desired state writes nothing: the reconciler
  re-applies on every step, and only a real change takes the cluster row's lock.
- Each new revision is announced with a Postgres ``NOTIFY`` in the same transaction
  (controller/db/notify.py): the cluster's waiting long polls wake when it commits.
- The revision is bumped under a row lock of ``pull_clusters``, so revisions follow the
  order in which transactions commit (a sequence would not: a transaction holding
  revision 10 may commit after one holding 11, and an agent already at 11 would never
  see 10's change).
- ``observe`` and ``list_nodes`` read the agent's last report. A report older than
  ``silent_after_s`` is no evidence about the cluster now: both raise a transient
  DriverError, so the reconciler holds the nodes where they are (as for an unreachable
  API server in push mode) and node sync keeps the inventory it has.

The driver never talks to the cluster, and the controller stores no credentials for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db import notify
from controller.db.base import utcnow
from controller.db.models import Cluster, PullCluster, PullDesired
from controller.kube.driver import DriverError, NodeInventory, ObservedWorkload, WorkloadSpec

# The channel on which a new desired revision is announced, with the cluster's name.
PULL_CHANNEL = "edgefleet_pull_desired"


class PullDriver:
    def __init__(
        self, session: Session, cluster: str, *, silent_after_s: float, now: datetime | None = None
    ) -> None:
        self.session = session
        self.cluster = cluster
        self.silent_after_s = silent_after_s
        self._now = now

    def now(self) -> datetime:
        return self._now or utcnow()

    # -- rows

    def _cluster_id(self) -> int | None:
        return self.session.scalar(select(Cluster.id).where(Cluster.name == self.cluster))

    def _state(self) -> PullCluster | None:
        cluster_id = self._cluster_id()
        return self.session.get(PullCluster, cluster_id) if cluster_id is not None else None

    def _report(self) -> dict[str, Any]:
        """The agent's last report, or a transient DriverError saying why there is none
        worth reading."""
        state = self._state()
        if state is None or state.reported_at is None:
            enrolled = state is not None and state.credential_hash is not None
            raise DriverError(
                f"cluster {self.cluster} is in pull mode and its cluster agent has not "
                + (
                    "reported yet"
                    if enrolled
                    else "enrolled yet (install the agent chart with clusterAgent.enabled=true)"
                ),
                transient=True,
            )
        age = (self.now() - state.reported_at).total_seconds()
        if age > self.silent_after_s:
            raise DriverError(
                f"cluster {self.cluster}: its cluster agent has not reported for {age:.0f} s "
                f"(last report {state.reported_at.isoformat(timespec='seconds')})",
                transient=True,
            )
        return state.report

    # -- ClusterDriver

    def check(self) -> None:
        self._report()

    def list_nodes(self) -> list[NodeInventory]:
        return [
            NodeInventory(
                name=n["name"],
                labels=n.get("labels") or {},
                architecture=n.get("architecture"),
                capacity=n.get("capacity") or {},
                allocatable=n.get("allocatable") or {},
                ready=bool(n.get("ready")),
                runtimes=tuple(n.get("runtimes") or ("onnx", "tflite")),
            )
            for n in self._report().get("nodes") or []
        ]

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]:
        """What each node runs of ``model``, from the agent's last report. A node in a
        handover has two pods (the version serving and the one it moves to): it reports
        the pod of the version it should run, as the push driver does; otherwise its
        last pod in the report."""
        report = self._report()
        wanted = self._wanted_versions(model, nodes)
        out = {n: ObservedWorkload("Absent") for n in nodes}
        for w in report.get("workloads") or []:
            node = w.get("node")
            if w.get("model") != model or node not in out:
                continue
            if node in wanted and out[node].version == wanted[node] != w.get("version"):
                continue  # the version it should run is already there
            out[node] = ObservedWorkload(
                w["phase"],
                w.get("version"),
                w.get("sha256"),
                w.get("reason"),
                int(w.get("restarts") or 0),
            )
        return out

    def _wanted_versions(self, model: str, nodes: Sequence[str]) -> dict[str, str]:
        cluster_id = self._cluster_id()
        rows = self.session.scalars(
            select(PullDesired).where(
                PullDesired.cluster_id == cluster_id,
                PullDesired.model == model,
                PullDesired.node.in_(list(nodes)),
            )
        )
        return {r.node: str(r.workload["version"]) for r in rows if r.workload is not None}

    def apply(self, model: str, desired: Mapping[str, WorkloadSpec | None]) -> None:
        cluster_id = self._cluster_id()
        if cluster_id is None:
            raise DriverError(f"cluster {self.cluster} is not registered", transient=False)
        wanted = {
            node: (spec.as_dict() if spec is not None else None) for node, spec in desired.items()
        }
        if not self._changes(cluster_id, model, wanted, lock=False):
            return
        state = self._locked_state(cluster_id)
        # Read again under the lock: another transaction may have written meanwhile.
        changes = self._changes(cluster_id, model, wanted, lock=True)
        if not changes:
            return
        state.revision += 1
        # Wakes the cluster's waiting long polls when (and only if) this commits.
        notify.send(self.session, PULL_CHANNEL, self.cluster)
        for node, (row, workload) in changes.items():
            if row is None:
                self.session.add(
                    PullDesired(
                        cluster_id=cluster_id,
                        model=model,
                        node=node,
                        workload=workload,
                        revision=state.revision,
                    )
                )
            else:
                row.workload, row.revision = workload, state.revision
        self.session.flush()

    def _changes(
        self,
        cluster_id: int,
        model: str,
        wanted: Mapping[str, dict[str, Any] | None],
        *,
        lock: bool,
    ) -> dict[str, tuple[PullDesired | None, dict[str, Any] | None]]:
        stmt = select(PullDesired).where(
            PullDesired.cluster_id == cluster_id,
            PullDesired.model == model,
            PullDesired.node.in_(list(wanted)),
        )
        if lock:
            stmt = stmt.execution_options(populate_existing=True)
        have = {row.node: row for row in self.session.scalars(stmt)}
        changes: dict[str, tuple[PullDesired | None, dict[str, Any] | None]] = {}
        for node, workload in wanted.items():
            row = have.get(node)
            if row is None and workload is None:
                continue  # never had one: nothing to take away
            if row is None or row.workload != workload:
                changes[node] = (row, workload)
        return changes

    def _locked_state(self, cluster_id: int) -> PullCluster:
        state = self.session.scalar(
            select(PullCluster)
            .where(PullCluster.cluster_id == cluster_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if state is None:  # applied before the cluster's row was made (it is, at apply)
            state = PullCluster(cluster_id=cluster_id, revision=0, report={})
            self.session.add(state)
            self.session.flush()
        return state
