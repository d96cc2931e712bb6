"""The schedule part of a reconcile step (spec.schedule): which nodes may start now,
the wave that waits for a window and says so once, windows missed while no step ran, the
progress deadline and the bake counted inside windows, and when the next step is worth
running."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from controller.db.models import (
    AssignmentState,
    RolloutPhase,
    Wave,
    WavePhase,
)
from controller.rollouts.repository import Row
from controller.rollouts.step import StepBase
from controller.schedules import windows
from controller.schedules.service import Calendars, GroupKey

log = logging.getLogger(__name__)
P, A = RolloutPhase, AssignmentState

# How a rollout's message begins while it waits for a maintenance window.
WAITING = "waiting for a maintenance window"


class ScheduledStep(StepBase):
    """A step that follows the rollout's schedule (spec.schedule): when a node may start."""

    @functools.cached_property
    def calendars(self) -> Calendars | None:
        """The calendars of the rollout's nodes, read once a step; None without a
        schedule (any time)."""
        if self.spec.schedule is None:
            return None
        return Calendars.load(self.s, self.spec.schedule, [r.node.id for r in self.rows])

    def allowed(self, rows: Iterable[Row]) -> list[Row]:
        """The rows whose calendar lets them start now: inside a window, in no freeze,
        not before the start time. Admission takes only these. A node admitted keeps going
        when its window closes or a freeze begins: a node is never left half-applied."""
        cals = self.calendars
        if cals is None:
            return list(rows)
        return [r for r in rows if cals.allows(r.node.id, self.now)]

    def follow_schedule(self, wave: Wave) -> bool:
        """Read the schedule for this step: report once the windows that opened since the
        last step (and those that opened and closed while no step ran: not replayed), say
        in the message and once in an event that the wave waits for a window, and
        remember the instant. False when the wave has not started and none of its nodes
        may start yet: it starts when the first of them may."""
        cals = self.calendars
        if cals is None:
            self._stop_waiting(wave)
            return True
        last, self.r.schedule_evaluated_at = self.r.schedule_evaluated_at, self.now
        pending = self.in_state(self.wave_rows(wave.index), A.PENDING)
        groups = cals.by_group(r.node.id for r in pending)
        if last is not None and last < self.now:
            self._catch_up(wave, cals, list(groups), last)
        verdicts = {key: cals.verdict(key, self.now) for key in groups}
        if not groups or any(v is not None and v.allowed for v in verdicts.values()):
            self._stop_waiting(wave)
            return True
        waits: dict[str, Any] = {}
        for key, ids in groups.items():
            group, verdict = cals.group(key), verdicts[key]
            entry: dict[str, Any] = {"nodes": len(ids)}
            if verdict is None:
                entry["problem"] = group.problem
            else:
                entry["reason"] = verdict.reason
                nxt = verdict.next_window
                entry["next"] = None if nxt is None else nxt.start.isoformat()
                if verdict.frozen_by:
                    entry["frozenBy"] = list(verdict.frozen_by)
            waits[group.label] = entry
        opens = [e["next"] for e in waits.values() if e.get("next")]
        frozen = sorted({f for e in waits.values() for f in e.get("frozenBy", [])})
        message = (
            f"{WAITING}: wave {wave.index} of {len(self.r.waves)}, {len(pending)} node(s) "
            "not started"
            + (f", frozen by {', '.join(frozen)}" if frozen else "")
            + (f"; the next opens at {min(opens)}" if opens else "; none opens within a year")
        )
        if self.r.message != message:  # once per wait, not once per step
            self.r.message = message
            self.event(
                reason="WaitingForWindow",
                message=message,
                data={"wave": wave.index, "zones": waits},
            )
        return wave.phase != WavePhase.PENDING

    def _stop_waiting(self, wave: Wave) -> None:
        if self.r.message is not None and self.r.message.startswith(WAITING):
            self.r.message = f"wave {wave.index} of {len(self.r.waves)} {wave.phase.lower()}"

    def _catch_up(self, wave: Wave, cals: Calendars, keys: list[GroupKey], last: datetime) -> None:
        opened: dict[str, Any] = {}
        missed: dict[str, Any] = {}
        for key in keys:
            group = cals.group(key)
            if group.calendar is None:
                continue
            got = windows.catch_up(group.calendar, last, self.now)
            if got.opened is not None:
                opened[group.label] = {
                    "opened": got.opened.start.isoformat(),
                    "closes": None if got.opened.end is None else got.opened.end.isoformat(),
                    "late_s": int((self.now - got.opened.start).total_seconds()),
                }
            if got.missed_total:
                missed[group.label] = {
                    "count": got.missed_total,
                    "windows": [[i.start.isoformat(), _iso(i.end)] for i in got.missed[:10]],
                }
        if missed:
            total = sum(m["count"] for m in missed.values())
            self.event(
                reason="WindowsMissed",
                message=(
                    f"wave {wave.index}: {total} window(s) opened and closed while no step "
                    "ran (the controller down, or the rollout paused); they are not replayed"
                ),
                data={"wave": wave.index, "zones": missed},
            )
        if opened:
            self.event(
                reason="WindowOpened",
                message=f"wave {wave.index}: window open for {', '.join(opened)}",
                data={"wave": wave.index, "zones": opened},
            )

    def waiting_for_window(self, unfinished: Sequence[Row]) -> bool:
        """The wave's unfinished nodes all wait to start and none may (a closed window,
        a freeze, a start time ahead): the wave is held, its progress deadline stands."""
        return (
            self.calendars is not None
            and all(r.assignment.state == A.PENDING for r in unfinished)
            and not self.allowed(unfinished)
        )

    def progress_since(self, wave: Wave, started: datetime) -> datetime:
        """Where the progress deadline counts from: the wave's start or, under a
        schedule, the latest instant since at which its nodes could start again (a
        window opening, a freeze's end), so a wave that paused has its whole deadline
        again when it may go on."""
        cals = self.calendars
        if cals is None or self.now <= started:
            return started
        latest = started
        # The horizon excludes its end, and the nodes may have been let go just now.
        span = self.now - started + timedelta(seconds=1)
        for key in cals.by_group(r.node.id for r in self.wave_rows(wave.index)):
            cal = cals.group(key).calendar
            if cal is None:
                continue
            for interval in windows.allowed_intervals(cal, started, span):
                if interval.start <= self.now:
                    latest = max(latest, interval.start)
        return latest

    def bake_until(self, wave: Wave) -> datetime:
        """When the wave's bake, starting now, ends: ``bakeInWindowsOnly`` counts only
        time inside the windows, until it has run in every zone of the wave."""
        bake = timedelta(seconds=wave.bake_s)
        cals = self.calendars
        if cals is None or not cals.schedule.bakeInWindowsOnly:
            return self.now + bake
        ends: list[datetime] = []
        for key in cals.by_group(r.node.id for r in self.wave_rows(wave.index)):
            cal = cals.group(key).calendar
            if cal is not None:
                end = windows.bake_end_in_windows(cal, self.now, bake)
                ends.append(self.now + windows.DEFAULT_HORIZON if end is None else end)
        return max(ends, default=self.now + bake)

    def wake_at(self) -> datetime | None:
        """When the next step is worth running, if the rollout does nothing but wait for
        a window: the earliest opening among its waiting nodes. None: the usual
        interval (nodes in flight, or none waiting)."""
        cals = self.calendars
        if cals is None or self.r.phase != P.PROGRESSING:
            return None
        if self.in_state(self.rows, A.APPLYING, A.RUNNING):
            return None
        wave = self.r.waves[self.r.current_wave]
        if wave.phase not in (WavePhase.PENDING, WavePhase.APPLYING):
            return None
        waiting = self.in_state(self.wave_rows(wave.index), A.PENDING)
        if not waiting or self.allowed(waiting):
            return None
        opens = []
        for key in cals.by_group(r.node.id for r in waiting):
            verdict = cals.verdict(key, self.now)
            if verdict is not None and verdict.next_window is not None:
                opens.append(verdict.next_window.start)
        return min(opens, default=None)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()
