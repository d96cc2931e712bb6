from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from controller.kit.manifest import Strict
from controller.schedules.spec import Schedule


class FreezeOut(BaseModel):
    """A freeze as stored: read from the row's attributes."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    generation: int
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class IntervalOut(BaseModel):
    start: datetime
    end: datetime | None


class ScheduleChange(Strict):
    """``POST /v1/rollouts/{name}/schedule``: the new schedule, or null to cancel it."""

    schedule: Schedule | None
