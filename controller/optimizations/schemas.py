from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class OptimizationOut(BaseModel):
    id: int
    model: str
    parent: str
    version: str
    method: str
    params: dict[str, Any]
    status: str
    stage: str | None
    message: str | None
    report: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
