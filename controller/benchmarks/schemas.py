from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controller.db.models import NodeBenchmark
from controller.fleet.selectors import Selector


class BenchmarkRequestIn(BaseModel):
    """Measure a version on the node classes of the selected nodes: one node per class."""

    model_config = ConfigDict(extra="forbid")

    selector: Selector = Field(
        default_factory=Selector,
        description="which nodes' classes to measure on (default: every enrolled Ready node)",
    )
    runs: int = Field(50, ge=1, le=10_000, description="timed inferences per benchmark")


class BenchmarkOut(BaseModel):
    id: int
    model: str
    version: str
    node_class: str
    node: str
    status: str
    runs: int
    result: dict[str, Any] | None
    message: str | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: NodeBenchmark, model: str, version: str) -> BenchmarkOut:
        return cls(
            id=row.id,
            model=model,
            version=version,
            node_class=row.node_class,
            node=row.node_name,
            status=row.status,
            runs=row.runs,
            result=row.result,
            message=row.message,
            started_at=row.started_at,
            finished_at=row.finished_at,
            updated_at=row.updated_at,
        )
