from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.arrays import any_of
from controller.db.models import (
    BenchmarkStatus,
    Cluster,
    Model,
    ModelVersion,
    Node,
    NodeBenchmark,
)


def for_version(session: Session, version_id: int) -> Sequence[NodeBenchmark]:
    return session.scalars(
        select(NodeBenchmark)
        .where(NodeBenchmark.model_version_id == version_id)
        .order_by(NodeBenchmark.node_class)
    ).all()


def for_model(session: Session, model_id: int) -> Sequence[tuple[NodeBenchmark, str]]:
    """Every benchmark of a model's versions, each with its version, by version and class."""
    rows = session.execute(
        select(NodeBenchmark, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == NodeBenchmark.model_version_id)
        .where(ModelVersion.model_id == model_id)
        .order_by(ModelVersion.id, NodeBenchmark.node_class)
    )
    return [(r[0], r[1]) for r in rows]


def by_class(session: Session, version_id: int) -> dict[str, NodeBenchmark]:
    return {b.node_class: b for b in for_version(session, version_id)}


def succeeded_for(
    session: Session, version_ids: Collection[int]
) -> dict[tuple[int, str], NodeBenchmark]:
    """The measured benchmarks of these versions, by (version id, node class)."""
    if not version_ids:
        return {}
    rows = session.scalars(
        select(NodeBenchmark).where(
            any_of(NodeBenchmark.model_version_id, version_ids),
            NodeBenchmark.status == BenchmarkStatus.SUCCEEDED,
        )
    )
    return {(b.model_version_id, b.node_class): b for b in rows}


def open_jobs(session: Session, node_id: int) -> Sequence[tuple[NodeBenchmark, ModelVersion, str]]:
    """This node's jobs not answered yet (Pending, or Running: fetched by an agent that
    may have restarted since), oldest first, locked against a concurrent answer."""
    rows = session.execute(
        select(NodeBenchmark, ModelVersion, Model.name)
        .join(ModelVersion, NodeBenchmark.model_version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .where(
            NodeBenchmark.node_id == node_id,
            NodeBenchmark.status.in_((BenchmarkStatus.PENDING, BenchmarkStatus.RUNNING)),
        )
        .order_by(NodeBenchmark.id)
        .with_for_update(of=NodeBenchmark)
    )
    return [(r[0], r[1], r[2]) for r in rows]


def lock(session: Session, benchmark_id: int) -> NodeBenchmark | None:
    return session.scalars(
        select(NodeBenchmark).where(NodeBenchmark.id == benchmark_id).with_for_update()
    ).first()


def candidate_nodes(session: Session) -> Sequence[tuple[Node, str]]:
    """Nodes an on-node benchmark can be asked of: enrolled (they have an agent)."""
    rows = session.execute(
        select(Node, Cluster.name)
        .join(Cluster)
        .where(Node.credential_hash.is_not(None))
        .order_by(Cluster.name, Node.name)
    )
    return [(r[0], r[1]) for r in rows]
