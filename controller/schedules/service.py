"""Freeze periods (stored and applied like any manifest kind) and the calendars of a
rollout's nodes: the values ``windows.py`` computes with, resolved from the rows. The
rollouts domain asks these calendars when a node may start; nothing here knows waves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from controller.audit import record_event
from controller.db.models import FreezePeriod as FreezeRow
from controller.errors import NotFound
from controller.kit.diff import diff
from controller.kit.outcome import ApplyOutcome
from controller.schedules import repository as repo
from controller.schedules.spec import (
    FreezePeriod,
    FreezePeriodManifest,
    FreezeSpec,
    Schedule,
    to_freeze,
    to_windows,
)
from controller.schedules.windows import (
    Calendar,
    Freeze,
    ScheduleError,
    Verdict,
    check,
    node_zone,
    zone_named,
)

KIND = "FreezePeriod"


# ---------------------------------------------------------------- freeze periods


def apply_freeze(session: Session, name: str, spec: FreezeSpec) -> ApplyOutcome:
    """Create or replace the freeze ``name``. Rollouts read freezes at every step, so a
    new freeze holds the next start of every rollout whose nodes it selects."""
    doc = spec.model_dump(mode="json", exclude_none=True)
    row = repo.get_freeze(session, name)
    changes: list[dict[str, Any]] = []
    if row is not None:
        changes = diff({"spec": row.spec}, {"spec": doc})
        if not changes:
            return ApplyOutcome(KIND, name, "unchanged", row.generation)
        row.generation += 1
        action = "configured"
    else:
        row = FreezeRow(name=name, generation=1)
        session.add(row)
        action = "created"
    row.spec = doc
    session.flush()
    record_event(
        session,
        kind=KIND,
        name=name,
        reason="Applied",
        message=f"{action} (generation {row.generation})",
        data={"changes": changes},
    )
    return ApplyOutcome(KIND, name, action, row.generation, changes)


def apply_freeze_manifest(session: Session, manifest: FreezePeriodManifest) -> ApplyOutcome:
    return apply_freeze(session, manifest.metadata.name, manifest.spec)


def create_freeze(session: Session, body: FreezePeriod) -> tuple[FreezeRow, str]:
    """``POST /v1/freezes``: create or replace; returns the row and what happened."""
    outcome = apply_freeze(session, body.name, body.spec())
    row = repo.get_freeze(session, body.name)
    assert row is not None
    return row, outcome.action


def require_freeze(session: Session, name: str) -> FreezeRow:
    row = repo.get_freeze(session, name)
    if row is None:
        raise NotFound(f"freeze period {name!r} not found")
    return row


def delete_freeze(session: Session, name: str) -> FreezeRow:
    """``DELETE /v1/freezes/{name}``: the freeze holds nothing from the next step of
    every rollout on (steps read the freezes afresh). Returns the row as it was."""
    row = require_freeze(session, name)
    record_event(
        session,
        kind=KIND,
        name=name,
        reason="Deleted",
        message=f"deleted (generation {row.generation}); it holds no start any more",
        data={"spec": row.spec},
    )
    repo.delete_freeze(session, row)
    return row


def list_freezes(session: Session) -> Sequence[FreezeRow]:
    return repo.list_freezes(session)


def freezes(session: Session) -> list[Freeze]:
    """Every stored freeze, as windows.py reads them (past ones cost a comparison each)."""
    return [
        to_freeze(FreezePeriod.of(row.name, FreezeSpec.model_validate(row.spec)))
        for row in repo.list_freezes(session)
    ]


# ---------------------------------------------------------------- calendars

GroupKey = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class Group:
    """Nodes that share one calendar: the same zone and the same freezes. ``calendar`` is
    None when the nodes have no zone (``problem`` says why): they never start."""

    zone: str | None
    freezes: tuple[str, ...]
    calendar: Calendar | None
    problem: str | None = None

    @property
    def label(self) -> str:
        return self.zone or "no time zone"


class Calendars:
    """The calendars of a set of nodes under ``schedule``, one per distinct (zone,
    freezes), so a 10,000-node rollout over three sites asks windows.py three times a
    step, not 10,000. Verdicts are cached per instant."""

    def __init__(
        self,
        schedule: Schedule,
        freezes: Sequence[Freeze],
        labels: Mapping[int, Mapping[str, str]],
    ) -> None:
        self.schedule = schedule
        self._groups: dict[GroupKey, Group] = {}
        self._of: dict[int, GroupKey] = {}
        self._verdicts: dict[tuple[GroupKey, datetime], Verdict] = {}
        windows = to_windows(schedule)
        zone = None if schedule.timeZone is None else zone_named(schedule.timeZone)
        for node_id, node_labels in labels.items():
            applying = tuple(f for f in freezes if f.applies(node_labels))
            names = tuple(f.name for f in applying)
            try:
                node_tz = node_zone(zone, node_labels)
            except ScheduleError as exc:
                key: GroupKey = (f"?{exc}", names)
                if key not in self._groups:
                    self._groups[key] = Group(None, names, None, str(exc))
            else:
                key = (node_tz.key, names)
                if key not in self._groups:
                    cal = Calendar(
                        zone=node_tz, windows=windows, freezes=applying, start_at=schedule.startAt
                    )
                    self._groups[key] = Group(node_tz.key, names, cal)
            self._of[node_id] = key

    @classmethod
    def load(cls, session: Session, schedule: Schedule, node_ids: Iterable[int]) -> Calendars:
        return cls(schedule, freezes(session), repo.node_labels(session, set(node_ids)))

    def key_of(self, node_id: int) -> GroupKey:
        return self._of[node_id]

    def group(self, key: GroupKey) -> Group:
        return self._groups[key]

    def by_group(self, node_ids: Iterable[int]) -> dict[GroupKey, list[int]]:
        """``node_ids`` by their calendar, groups in zone order."""
        out: dict[GroupKey, list[int]] = {}
        for node_id in node_ids:
            out.setdefault(self._of[node_id], []).append(node_id)
        return dict(sorted(out.items()))

    def verdict(self, key: GroupKey, now: datetime) -> Verdict | None:
        """What windows.check says for the group at ``now``; None: the group has no zone."""
        cal = self._groups[key].calendar
        if cal is None:
            return None
        cached = self._verdicts.get((key, now))
        if cached is None:
            cached = self._verdicts[(key, now)] = check(cal, now)
        return cached

    def allows(self, node_id: int, now: datetime) -> bool:
        verdict = self.verdict(self._of[node_id], now)
        return verdict is not None and verdict.allowed
