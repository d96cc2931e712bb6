from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from controller.db.models import Event, Rollout


class EventOut(BaseModel):
    id: int
    time: datetime
    reason: str
    message: str
    data: dict[str, Any]
    actor: str | None = None

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(
            id=e.id,
            time=e.created_at,
            reason=e.reason,
            message=e.message,
            data=e.data,
            actor=e.actor,
        )


class WaveOut(BaseModel):
    index: int
    phase: str
    nodes: int
    bake_s: int
    states: dict[str, int]
    started_at: datetime | None
    baked_at: datetime | None
    finished_at: datetime | None


class RolloutNodeOut(BaseModel):
    """One node of a rollout: where it is in the rollout, and why."""

    cluster: str
    node: str
    wave: int | None = Field(description="The wave's index; null: in no wave")
    state: str
    desired: str | None = Field(description="The version the node should run")
    observed: str | None = Field(description="The version its agent last reported running")
    message: str | None = Field(description="Why it is in this state (a failure's reason)")
    metrics: dict[str, Any] = Field(description="Its agent's latest inference metrics window")
    updated_at: datetime


class RolloutStatus(BaseModel):
    # Nodes a Succeeded rollout has still to bring to its version: offline while it ran,
    # or back and converging (their health check not passed yet). Of a RolledBack or
    # Aborted one: nodes not yet seen back on their previous version (being reverted,
    # or offline: reverted once they are back). 0 in other phases.
    pending: int = 0


class RolloutSummary(BaseModel):
    name: str
    generation: int
    phase: str
    model: str
    version: str
    current_wave: int
    waves: int
    message: str | None
    created_at: datetime
    updated_at: datetime
    status: RolloutStatus = Field(default_factory=RolloutStatus)


class RolloutOut(RolloutSummary):
    spec: dict[str, Any]
    states: dict[str, int]
    # Nodes per planned version: one entry, or one per variant chosen (spec.model.variants).
    versions: dict[str, int]
    wave_detail: list[WaveOut]
    started_at: datetime | None
    finished_at: datetime | None
    events: list[EventOut]


def summary(r: Rollout, model: str, version: str, *, pending: int = 0) -> RolloutSummary:
    return RolloutSummary(
        name=r.name,
        generation=r.generation,
        phase=r.phase,
        model=model,
        version=version,
        current_wave=r.current_wave,
        waves=len(r.waves),
        message=r.message,
        created_at=r.created_at,
        updated_at=r.updated_at,
        status=RolloutStatus(pending=pending),
    )
