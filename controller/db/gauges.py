"""The fleet-state gauges of ``/metrics``: rollouts by phase, nodes by health, model
versions by status, counted in the database at scrape time (every replica answers the
same, and nothing has to keep them in step with the writes)."""

from __future__ import annotations

from enum import Enum

from prometheus_client import Gauge
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import InstrumentedAttribute

from controller import metrics as m
from controller.db.models import (
    ModelVersion,
    Node,
    NodeHealth,
    Rollout,
    RolloutPhase,
    VersionStatus,
)

_GAUGES: tuple[tuple[Gauge, InstrumentedAttribute[str], type[Enum]], ...] = (
    (m.ROLLOUTS, Rollout.phase, RolloutPhase),
    (m.NODES, Node.health, NodeHealth),
    (m.MODEL_VERSIONS, ModelVersion.status, VersionStatus),
)


def refresh_state_gauges(conn: Connection) -> None:
    """Set each gauge's value per label from one ``GROUP BY`` each; labels with no rows
    read 0 (a phase that emptied must not keep its last count)."""
    for gauge, column, values in _GAUGES:
        counts = dict(conn.execute(select(column, func.count()).group_by(column)).all())
        for value in values:
            gauge.labels(value.value).set(counts.get(value.value, 0))
