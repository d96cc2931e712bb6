"""All SQL of the model registry."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.db.arrays import any_of
from controller.db.models import (
    Assignment,
    Cluster,
    Model,
    ModelVersion,
    Node,
    NodeBenchmark,
    Rollout,
    VersionStatus,
)


def get_model(session: Session, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.name == name))


def get_or_create_model(session: Session, name: str, description: str | None) -> Model:
    model = get_model(session, name)
    if model is not None:
        return model
    try:
        with session.begin_nested():
            model = Model(name=name, description=description)
            session.add(model)
    except IntegrityError:  # created concurrently by another push
        model = get_model(session, name)
        assert model is not None
    return model


def list_models(session: Session, *, limit: int, offset: int) -> tuple[Sequence[Model], int]:
    total = session.scalar(select(func.count()).select_from(Model)) or 0
    rows = session.scalars(select(Model).order_by(Model.name).limit(limit).offset(offset)).all()
    return rows, total


def version_counts(session: Session, model_ids: Sequence[int]) -> dict[int, tuple[int, str | None]]:
    """(number of versions, newest version string) per model id, in two queries."""
    if not model_ids:
        return {}
    counts: dict[int, int] = {
        row[0]: row[1]
        for row in session.execute(
            select(ModelVersion.model_id, func.count())
            .where(any_of(ModelVersion.model_id, model_ids))
            .group_by(ModelVersion.model_id)
        )
    }
    newest_ids = (
        select(func.max(ModelVersion.id))
        .where(any_of(ModelVersion.model_id, model_ids))
        .group_by(ModelVersion.model_id)
    )
    newest: dict[int, str] = {
        row[0]: row[1]
        for row in session.execute(
            select(ModelVersion.model_id, ModelVersion.version).where(
                ModelVersion.id.in_(newest_ids)
            )
        )
    }
    return {mid: (counts.get(mid, 0), newest.get(mid)) for mid in model_ids}


def get_version(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).join(Model).where(Model.name == name, ModelVersion.version == version)
    )


def get_version_by_id(
    session: Session, version_id: int, *, lock: bool = False
) -> ModelVersion | None:
    stmt = select(ModelVersion).where(ModelVersion.id == version_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def list_versions(
    session: Session, model_id: int, *, limit: int, offset: int
) -> tuple[Sequence[ModelVersion], int]:
    total = (
        session.scalar(
            select(func.count()).select_from(ModelVersion).where(ModelVersion.model_id == model_id)
        )
        or 0
    )
    rows = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id)
        .order_by(ModelVersion.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return rows, total


def version_users(session: Session, version_id: int) -> tuple[list[str], int]:
    """What keeps a version from being deleted: the rollouts of it, and how many node
    assignments name it (desired, planned, previous or observed)."""
    rollouts = session.scalars(
        select(Rollout.name).where(Rollout.model_version_id == version_id).order_by(Rollout.name)
    ).all()
    nodes = session.scalar(
        select(func.count())
        .select_from(Assignment)
        .where(
            or_(
                Assignment.desired_version_id == version_id,
                Assignment.target_version_id == version_id,
                Assignment.previous_version_id == version_id,
                Assignment.observed_version_id == version_id,
            )
        )
    )
    return list(rollouts), nodes or 0


def add_version(session: Session, version: ModelVersion) -> bool:
    """Insert ``version``; False if (model, version) was inserted concurrently."""
    try:
        with session.begin_nested():
            session.add(version)
    except IntegrityError:
        return False
    return True


def stuck_version_ids(session: Session, *, before: datetime) -> Sequence[int]:
    return session.scalars(
        select(ModelVersion.id).where(
            ModelVersion.status.in_([VersionStatus.PENDING, VersionStatus.VALIDATING]),
            ModelVersion.status_changed_at < before,
        )
    ).all()


def version_reaches(session: Session, version_id: int, *, cluster: str, node: str | None) -> bool:
    """Whether a version is meant for (or was, or is benchmarked on) a node of ``cluster``
    (``node`` of it, when given): desired, targeted, kept for a rollback, observed, or a
    benchmark job of that node."""
    assigned = (
        select(Assignment.id)
        .join(Node, Node.id == Assignment.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .where(
            Cluster.name == cluster,
            or_(
                Assignment.desired_version_id == version_id,
                Assignment.target_version_id == version_id,
                Assignment.previous_version_id == version_id,
                Assignment.observed_version_id == version_id,
            ),
        )
    )
    if node is not None:
        assigned = assigned.where(Node.name == node)
    if session.scalar(select(exists(assigned))):
        return True
    if node is None:
        return False
    benchmarked = (
        select(NodeBenchmark.id)
        .join(Node, Node.id == NodeBenchmark.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .where(
            NodeBenchmark.model_version_id == version_id,
            Cluster.name == cluster,
            Node.name == node,
        )
    )
    return bool(session.scalar(select(exists(benchmarked))))
