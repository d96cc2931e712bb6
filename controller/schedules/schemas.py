from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from controller.db.models import FreezePeriod
from controller.kit.manifest import Strict
from controller.schedules.spec import Schedule


class FreezeOut(BaseModel):
    name: str
    generation: int
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, f: FreezePeriod) -> FreezeOut:
        return cls(
            name=f.name,
            generation=f.generation,
            spec=f.spec,
            created_at=f.created_at,
            updated_at=f.updated_at,
        )


class IntervalOut(BaseModel):
    start: datetime
    end: datetime | None


class ScheduleChange(Strict):
    """``POST /v1/rollouts/{name}/schedule``: the new schedule, or null to cancel it."""

    schedule: Schedule | None
