"""All SQL of the optimization jobs."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Model, Optimization


def get_job(session: Session, name: str, job_id: int) -> Optimization | None:
    return session.scalar(
        select(Optimization).join(Model).where(Optimization.id == job_id, Model.name == name)
    )
