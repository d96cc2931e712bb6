"""All SQL of the optimization jobs."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Model, ModelVersion, Optimization


def get_job(session: Session, name: str, job_id: int) -> Optimization | None:
    return session.scalar(
        select(Optimization).join(Model).where(Optimization.id == job_id, Model.name == name)
    )


def jobs_of_model(
    session: Session, model_id: int, *, limit: int
) -> Sequence[tuple[Optimization, str]]:
    """A model's newest optimization jobs, each with its parent's version."""
    rows = session.execute(
        select(Optimization, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == Optimization.parent_version_id)
        .where(Optimization.model_id == model_id)
        .order_by(Optimization.id.desc())
        .limit(limit)
    )
    return [(r[0], r[1]) for r in rows]
