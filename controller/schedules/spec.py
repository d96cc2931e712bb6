"""Manifest and API fields of schedules: a Rollout's ``schedule`` and the ``FreezePeriod``
kind. Unknown fields are errors; every error names its field and the expected form; every
size and count is bounded. ``to_windows`` and ``to_freeze`` turn them into the values of
``windows.py``, which does the arithmetic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from cronsim import CronSim
from pydantic import AwareDatetime, Field, ValidationInfo, field_validator, model_validator

from controller.kit.durations import parse_duration
from controller.kit.manifest import Document, LabelKey, LabelValue, Name, Strict
from controller.schedules.windows import (
    TIMEZONE_LABEL,
    Calendar,
    Freeze,
    Interval,
    ScheduleError,
    Selector,
    Window,
    calendar_for,
    parse_cron,
    zone_named,
)

MAX_WINDOWS = 16
MAX_WINDOW_DURATION = timedelta(days=7)
MAX_FREEZE_DURATION = timedelta(days=366)
MIN_DURATION = timedelta(minutes=1)
# A maintenance window that opens more often than every half hour on average is a
# schedule nobody means; it would also make every query walk thousands of starts. For
# "any time", leave windows out.
MAX_STARTS_PER_DAY = 48

Cron = Annotated[
    str,
    Field(
        max_length=100,
        description="5-field cron expression (minute hour day-of-month month day-of-week), "
        "read in the time zone: '0 1 * * *' is 01:00 every day",
    ),
]
Duration = Annotated[
    str, Field(max_length=32, description="duration: 30m, 4h, 1h30m, 2d (Go-style units)")
]
TimeZone = Annotated[
    str, Field(max_length=64, description="IANA time zone name: Europe/Berlin, UTC")
]


def _duration(text: str, lo: timedelta, hi: timedelta) -> timedelta:
    try:
        value = timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if not lo <= value <= hi:
        raise ValueError(f"{text!r} is out of range: a duration from {_human(lo)} to {_human(hi)}")
    return value


def _human(d: timedelta) -> str:
    if d % timedelta(days=1) == timedelta(0):
        return f"{d.days}d"
    if d % timedelta(hours=1) == timedelta(0):
        return f"{d // timedelta(hours=1)}h"
    return f"{d // timedelta(minutes=1)}m"


def _cron(text: str) -> str:
    try:
        return parse_cron(text)
    except ScheduleError as exc:
        raise ValueError(str(exc)) from None


def _not_too_often(cron: str) -> None:
    # Every day a cron fires, it fires at the same minutes of the same hours: count the
    # starts of its first firing day (in UTC, where no day is longer than another). A
    # fixed week would miss "*/5 * * 12 *", which sleeps until December.
    first = next(CronSim(cron, datetime(2026, 1, 1, tzinfo=UTC)), None)
    if first is None:
        return
    day = first.replace(hour=0, minute=0)
    for count, t in enumerate(CronSim(cron, day - timedelta(seconds=1)), 1):
        if t >= day + timedelta(days=1):
            return
        if count > MAX_STARTS_PER_DAY:
            raise ValueError(
                f"{cron!r} opens more than {MAX_STARTS_PER_DAY} times a day; a maintenance "
                "window opens at most every 30 minutes (for any time, omit windows)"
            )


def _zone(name: str | None) -> str | None:
    if name is not None:
        try:
            zone_named(name)
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
    return name


class MaintenanceWindow(Strict):
    cron: Cron
    duration: Duration = Field(description="how long the window stays open: 1m to 7d")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        cron = _cron(v)
        _not_too_often(cron)
        return cron

    @field_validator("duration")
    @classmethod
    def _valid_duration(cls, v: str) -> str:
        _duration(v, MIN_DURATION, MAX_WINDOW_DURATION)
        return v


class Schedule(Strict):
    """``spec.schedule`` of a Rollout."""

    startAt: AwareDatetime | None = Field(
        None,
        description="RFC 3339 instant with an offset (2026-12-01T02:00:00Z); no wave starts "
        "before it",
    )
    timeZone: TimeZone | None = Field(
        None,
        description=f"zone the windows are read in; omitted: each node's {TIMEZONE_LABEL} "
        "label, with '.' for '/' (America.New_York), since label values cannot hold '/'",
    )
    windows: list[MaintenanceWindow] = Field(
        default_factory=list,
        max_length=MAX_WINDOWS,
        description="waves start nodes only while one of these is open; none: any time",
    )
    bakeInWindowsOnly: bool = Field(
        False, description="count a wave's bake time only while a window is open"
    )

    @field_validator("timeZone")
    @classmethod
    def _valid_zone(cls, v: str | None) -> str | None:
        return _zone(v)

    @model_validator(mode="after")
    def _bake_needs_windows(self) -> Schedule:
        if self.bakeInWindowsOnly and not self.windows:
            raise ValueError("bakeInWindowsOnly needs at least one window")
        return self


def to_windows(schedule: Schedule) -> tuple[Window, ...]:
    return tuple(
        Window(w.cron, timedelta(seconds=parse_duration(w.duration))) for w in schedule.windows
    )


def to_calendar(
    schedule: Schedule, labels: Mapping[str, str], freezes: Iterable[Freeze] = ()
) -> Calendar:
    """The calendar of one node under ``schedule``: ScheduleError if neither the schedule
    nor the node's label gives it a zone."""
    return calendar_for(
        labels=labels,
        windows=to_windows(schedule),
        zone=None if schedule.timeZone is None else zone_named(schedule.timeZone),
        start_at=schedule.startAt,
        freezes=freezes,
    )


class FreezeSelector(Strict):
    matchLabels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=32, description="empty: every node"
    )


class FreezeSpec(Strict):
    """A freeze: no wave starts on the nodes it selects while it lasts. Either a fixed
    ``start``/``end``, or a recurring ``cron`` + ``duration`` read in ``timeZone``
    (omitted: each node's zone, so a holiday freeze follows every site's own midnight).
    The ``spec`` of a ``FreezePeriod`` manifest."""

    start: AwareDatetime | None = Field(None, description="RFC 3339 instant with an offset")
    end: AwareDatetime | None = Field(None, description="RFC 3339 instant with an offset")
    cron: Cron | None = None
    duration: Duration | None = Field(None, description="with cron: 1m to 366d")
    timeZone: TimeZone | None = Field(None, description="with cron only")
    selector: FreezeSelector = Field(default_factory=FreezeSelector)
    reason: str = Field("", max_length=500)

    @field_validator("end")
    @classmethod
    def _after_start(cls, v: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start")
        if v is not None and start is not None and v <= start:
            raise ValueError(f"end ({v.isoformat()}) must be after start ({start.isoformat()})")
        return v

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str | None) -> str | None:
        return None if v is None else _cron(v)

    @field_validator("duration")
    @classmethod
    def _valid_duration(cls, v: str | None) -> str | None:
        if v is not None:
            _duration(v, MIN_DURATION, MAX_FREEZE_DURATION)
        return v

    @field_validator("timeZone")
    @classmethod
    def _valid_zone(cls, v: str | None) -> str | None:
        return _zone(v)

    @model_validator(mode="after")
    def _one_form(self) -> FreezeSpec:
        fixed = self.start is not None or self.end is not None
        recurring = self.cron is not None or self.duration is not None
        if fixed == recurring:
            raise ValueError(
                "give either start and end (a fixed freeze) or cron and duration (a recurring one)"
            )
        if fixed:
            if self.start is None or self.end is None:
                raise ValueError("a fixed freeze needs both start and end")
            if self.end - self.start > MAX_FREEZE_DURATION:
                raise ValueError(f"a freeze lasts at most {_human(MAX_FREEZE_DURATION)}")
            if self.timeZone is not None:
                raise ValueError(
                    "timeZone applies to a recurring freeze only: start and end carry "
                    "their own offsets"
                )
        elif self.cron is None or self.duration is None:
            raise ValueError("a recurring freeze needs both cron and duration")
        return self


class FreezePeriod(FreezeSpec):
    """A named freeze, as ``POST /v1/freezes`` takes it: the spec and its name."""

    name: Name

    @classmethod
    def of(cls, name: str, spec: FreezeSpec) -> FreezePeriod:
        return cls.model_validate({"name": name, **spec.model_dump(exclude_none=True)})

    def spec(self) -> FreezeSpec:
        return FreezeSpec.model_validate(self.model_dump(exclude={"name"}, exclude_none=True))


class FreezePeriodManifest(Document):
    kind: Literal["FreezePeriod"]
    spec: FreezeSpec


def _matcher(labels: Mapping[str, str]) -> Selector:
    wanted = dict(labels)

    def applies(node_labels: Mapping[str, str]) -> bool:
        return all(node_labels.get(k) == v for k, v in wanted.items())

    return applies


def to_freeze(spec: FreezePeriod) -> Freeze:
    when: Interval | Window
    if spec.cron is not None and spec.duration is not None:
        when = Window(spec.cron, timedelta(seconds=parse_duration(spec.duration)))
    elif spec.start is not None and spec.end is not None:
        when = Interval(spec.start, spec.end)
    else:  # FreezePeriod._one_form refuses this
        raise ScheduleError(f"freeze {spec.name!r} has neither start/end nor cron/duration")
    return Freeze(
        name=spec.name,
        when=when,
        zone=None if spec.timeZone is None else zone_named(spec.timeZone),
        applies=_matcher(spec.selector.matchLabels),
        reason=spec.reason,
    )
