"""Stand-ins for the node agents of a simulated fleet: one heartbeat per node that runs a
workload, with the numbers a caller gives it, ingested exactly as real agents' are. The
demo, the tests and the fleet bench report through here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from controller.db.models import Assignment, AssignmentState, Cluster, Model, ModelVersion, Node
from controller.db.session import session_scope
from controller.fleet.service import ingest_heartbeats
from node_agent.contract import Heartbeat, InferenceMetrics, WorkloadReport


@dataclass(frozen=True)
class RunningWorkload:
    cluster: str
    node: str
    architecture: str | None
    model: str
    version: ModelVersion

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.node}"


# The nodes whose workload the controller set going, as their agents see them: a real
# agent reports whatever runs on its node, also while the controller still counts the
# node Applying (a node converging after its rollout ended waits there for its health
# check, and its evidence is these reports).
LIVE_STATES = (AssignmentState.APPLYING, AssignmentState.RUNNING, AssignmentState.HEALTHY)


def report_running(
    metrics_for: Callable[[RunningWorkload], InferenceMetrics],
    seq: Iterator[int],
    *,
    states: Sequence[str] = LIVE_STATES,
) -> int:
    """Stand in for the node agents: one heartbeat per node running a workload (with the
    numbers ``metrics_for`` gives it), ingested exactly as the agents' are. The demo, the
    tests and the fleet bench report through here. Each node reports the version the
    controller last observed on it (Assignment.observed_version_id): a node Applying
    whose new version is not up yet still runs, and reports, its previous one."""
    with session_scope() as s:
        rows = s.execute(
            select(Node.name, Node.architecture, Cluster.name, Model.name, ModelVersion)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .join(Assignment, Assignment.node_id == Node.id)
            .join(Model, Model.id == Assignment.model_id)
            .join(ModelVersion, ModelVersion.id == Assignment.observed_version_id)
            .where(Assignment.state.in_(states))
        ).all()
        now = datetime.now(UTC)
        beats = []
        for node, arch, cluster, model, version in rows:
            workload = RunningWorkload(cluster, node, arch, model, version)
            report = WorkloadReport(
                model=model,
                version=version.version,
                sha256=version.sha256,
                state="Ready",
                metrics=metrics_for(workload),
            )
            beats.append(
                Heartbeat(
                    cluster=cluster, node=node, seq=next(seq), sent_at=now, workloads=[report]
                )
            )
        ingest_heartbeats(s, beats)
    return len(beats)
