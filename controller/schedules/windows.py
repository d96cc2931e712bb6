"""When a node may start work: maintenance windows, freeze periods and a rollout's start
time, as pure functions of an injected ``now`` (no clock, no database, no I/O).

A window is a 5-field cron expression (when it opens) and a duration (how long it stays
open), read in an IANA time zone. The zone is the rollout's, or else the node's site label
``edgefleet.io/timezone``. A freeze is a fixed interval or a recurring cron + duration;
no work starts inside one. Everything returned is a timezone-aware UTC instant, and every
interval is half-open, ``[start, end)``: a window of 01:00 for 4h admits 01:00 and refuses
05:00.

Cron across daylight-saving changes (the semantics of Debian's cron, which cronsim keeps
for aware datetimes; tests/schedules/test_windows.py pins each case):

- An expression whose minute and hour fields are both fixed (``30 2 * * *``, ``0 1-4 * *
  1-5``) follows the wall clock. A time the spring-forward change skips fires at the first
  real minute after the gap: ``30 2 * * *`` in Europe/Berlin on 2026-03-29 (02:00 CET jumps
  to 03:00 CEST) opens at 03:00 CEST. A time the fall-back change repeats fires once, at
  its first occurrence: ``30 1 * * *`` in America/New_York on 2026-11-01 opens at 01:30
  EDT (05:30 UTC), not again at 01:30 EST.
- An expression with a wildcard minute or hour (``0 * * * *``, ``*/30 * * * *``) follows
  elapsed time: it fires whenever the local clock shows a matching time, so a repeated
  hour matches twice and a skipped hour not at all.
- A duration is elapsed time, not wall-clock time: a 4h window opening at 01:00 on the
  Berlin spring-forward night closes at 06:00 CEST, four real hours later.

Overlapping or touching windows merge into one interval. A freeze cuts the intervals in
which work may start; a wave already running when a freeze or a window's end arrives
stops starting nodes and keeps the ones already moved (the engine's business, not this
module's). Nothing beyond ``horizon`` (by default about 13 months, so a yearly window is
still found) is looked at: no window opening after it is found (searches return None),
overlapping windows stop merging there, and a schedule without windows is open-ended
(``end`` None) after the last freeze within it.

Cost: each query walks the cron starts between its ``since`` and the first answer, a few
per day for a real maintenance window (the manifest refuses windows that open more than
48 times a day).
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError

TIMEZONE_LABEL = "edgefleet.io/timezone"
DEFAULT_HORIZON = timedelta(days=400)
# Missed windows reported by catch_up() after a long outage; the total is still counted.
MAX_MISSED = 100

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_FOREVER = datetime.max.replace(tzinfo=UTC)
_NEVER = datetime.min.replace(tzinfo=UTC)
_TICK = timedelta(microseconds=1)


class ScheduleError(ValueError):
    """A cron expression, time zone or schedule that cannot be evaluated."""


# ---------------------------------------------------------------- values


def _utc(t: datetime, what: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ScheduleError(f"{what} must be timezone-aware, got {t.isoformat()}")
    return t.astimezone(UTC)


@dataclass(frozen=True)
class Interval:
    """``[start, end)`` in UTC; ``end`` None means open-ended (a schedule without windows
    and no freeze ahead within the horizon). Without windows there is no opening to look
    back to, so an interval open at the instant asked about starts there."""

    start: datetime
    end: datetime | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _utc(self.start, "start"))
        if self.end is not None:
            object.__setattr__(self, "end", _utc(self.end, "end"))
            if self.end <= self.start:
                raise ScheduleError(f"interval ends ({self.end}) before it starts ({self.start})")

    def __contains__(self, t: datetime) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


def parse_cron(expr: str) -> str:
    """The expression with its fields single-spaced, if cronsim reads it as 5 fields
    (minute hour day-of-month month day-of-week); ScheduleError naming the bad field
    otherwise."""
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"{expr!r} has {len(fields)} fields; a cron expression has 5: "
            "minute hour day-of-month month day-of-week, e.g. '0 1 * * *'"
        )
    normal = " ".join(fields)
    try:
        it = CronSim(normal, _EPOCH)
        next(it)
    except CronSimError as exc:
        raise ScheduleError(
            f"{expr!r} is not a cron expression: {exc} (expected minute 0-59, hour 0-23, "
            "day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 or SUN-SAT)"
        ) from None
    except StopIteration:
        raise ScheduleError(f"{expr!r} never fires") from None
    return normal


@functools.cache
def _zone_names() -> frozenset[str]:
    # The IANA names only: ZoneInfo alone would also open posixrules, right/... and
    # posix/... files that only some systems ship.
    return frozenset(available_timezones())


def zone_named(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (``Europe/Berlin``); ScheduleError for anything else."""
    if name in _zone_names():
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    raise ScheduleError(
        f"{name!r} is not an IANA time zone name (examples: UTC, Europe/Berlin, America/New_York)"
    )


def zone_from_label(value: str) -> ZoneInfo:
    """The zone a node's ``edgefleet.io/timezone`` label names. Kubernetes label values
    cannot hold '/', so the label writes it as '.' (``America.New_York``); IANA names
    never contain '.', so the mapping is exact. A value with '/' is accepted as is."""
    return zone_named(value.replace(".", "/"))


def node_zone(schedule_zone: ZoneInfo | None, labels: Mapping[str, str]) -> ZoneInfo:
    """The zone a node's windows are read in: the rollout's, else the node's label. A node
    with neither is refused (ScheduleError) rather than read as UTC: a store's 01:00-05:00
    window read in the wrong zone would touch it at lunchtime."""
    if schedule_zone is not None:
        return schedule_zone
    value = labels.get(TIMEZONE_LABEL)
    if value is None:
        raise ScheduleError(
            f"the schedule has no timeZone and the node has no {TIMEZONE_LABEL} label"
        )
    return zone_from_label(value)


@dataclass(frozen=True)
class Window:
    """Opens at each time ``cron`` names (in the calendar's zone), for ``duration``."""

    cron: str
    duration: timedelta

    def __post_init__(self) -> None:
        object.__setattr__(self, "cron", parse_cron(self.cron))
        if self.duration <= timedelta(0):
            raise ScheduleError(f"window duration must be positive, got {self.duration}")


# Which nodes a freeze holds, from their labels.
Selector = Callable[[Mapping[str, str]], bool]


def everywhere(_labels: Mapping[str, str]) -> bool:
    return True


@dataclass(frozen=True)
class Freeze:
    """No work starts inside ``when``: a fixed interval, or a recurring window read in
    ``zone`` (None: the node's zone). ``applies`` says which nodes it holds, from their
    labels; the caller supplies it (a matchLabels selector, say)."""

    name: str
    when: Interval | Window
    zone: ZoneInfo | None = None
    applies: Selector = everywhere
    reason: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.when, Interval) and self.when.end is None:
            raise ScheduleError(f"freeze {self.name!r} needs an end")


@dataclass(frozen=True)
class Calendar:
    """Everything that decides when one node may start work, resolved for that node: its
    zone, the rollout's windows (none: any time) and start, the freezes that hold it."""

    zone: ZoneInfo
    windows: tuple[Window, ...] = ()
    freezes: tuple[Freeze, ...] = ()
    start_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.start_at is not None:
            object.__setattr__(self, "start_at", _utc(self.start_at, "start_at"))


def calendar_for(
    *,
    labels: Mapping[str, str],
    windows: Sequence[Window] = (),
    zone: ZoneInfo | None = None,
    start_at: datetime | None = None,
    freezes: Iterable[Freeze] = (),
) -> Calendar:
    """The calendar of the node with ``labels``: its zone (see node_zone) and only the
    freezes that apply to it."""
    return Calendar(
        zone=node_zone(zone, labels),
        windows=tuple(windows),
        freezes=tuple(f for f in freezes if f.applies(labels)),
        start_at=start_at,
    )


# ---------------------------------------------------------------- streams
# Internally an interval is a (start, end) pair of UTC datetimes, end _FOREVER when open.

_Span = tuple[datetime, datetime]


def _starts(cron: str, zone: ZoneInfo, lo: datetime, until: datetime) -> Iterator[datetime]:
    """The instants in [lo, until) at which ``cron`` fires in ``zone``, ascending."""
    # CronSim yields instants strictly after its seed; seeding one microsecond early
    # includes lo itself.
    last = lo
    for local in CronSim(cron, (lo - _TICK).astimezone(zone)):
        t = local.astimezone(UTC)
        if t >= until:
            return
        # Seeded inside the second pass of a repeated hour, cronsim's wall-clock mode can
        # answer the first pass, which lies before lo.
        if t >= last:
            last = t
            yield t


def _occurrences(
    window: Window, zone: ZoneInfo, since: datetime, until: datetime
) -> Iterator[_Span]:
    """Openings of ``window`` that are still open after ``since`` and start before until."""
    for t in _starts(window.cron, zone, since - window.duration, until):
        if t + window.duration > since:
            yield t, t + window.duration


def _merged(spans: Iterable[_Span]) -> Iterator[_Span]:
    """Sorted spans with overlapping and touching ones joined."""
    current: _Span | None = None
    for start, end in spans:
        if current is None:
            current = (start, end)
        elif start <= current[1]:
            current = (current[0], max(current[1], end))
        else:
            yield current
            current = (start, end)
    if current is not None:
        yield current


def _union(streams: Iterable[Iterator[_Span]]) -> Iterator[_Span]:
    return _merged(heapq.merge(*streams, key=lambda span: span[0]))


def _minus(base: Iterator[_Span], cuts: Iterator[_Span]) -> Iterator[_Span]:
    """``base`` with ``cuts`` removed; both sorted and merged."""
    cut = next(cuts, None)
    for start, end in base:
        while start < end:
            while cut is not None and cut[1] <= start:
                cut = next(cuts, None)
            if cut is None or cut[0] >= end:
                yield start, end
                break
            if cut[0] > start:
                yield start, cut[0]
            start = cut[1]


def _window_spans(cal: Calendar, since: datetime, until: datetime) -> Iterator[_Span]:
    if not cal.windows:
        return iter([(since, _FOREVER)])
    return _union(_occurrences(w, cal.zone, since, until) for w in cal.windows)


def _freeze_spans(
    freeze: Freeze, zone: ZoneInfo, since: datetime, until: datetime
) -> Iterator[_Span]:
    when = freeze.when
    if isinstance(when, Window):
        yield from _occurrences(when, freeze.zone or zone, since, until)
    elif when.end is not None and when.end > since and when.start < until:
        yield when.start, when.end


def _blocked_spans(cal: Calendar, since: datetime, until: datetime) -> Iterator[_Span]:
    streams = [_freeze_spans(f, cal.zone, since, until) for f in cal.freezes]
    if cal.start_at is not None:
        streams.append(iter([(_NEVER, cal.start_at)]))
    return _union(streams)


def _public(span: _Span) -> Interval:
    return Interval(span[0], None if span[1] == _FOREVER else span[1])


def _bounds(since: datetime, horizon: timedelta) -> tuple[datetime, datetime]:
    since = _utc(since, "now")
    return since, since + horizon


# ---------------------------------------------------------------- queries


def window_intervals(
    cal: Calendar, since: datetime, horizon: timedelta = DEFAULT_HORIZON
) -> Iterator[Interval]:
    """The windows (merged, freezes and start time ignored) still open after ``since``
    and opening before ``since + horizon``; the first may have opened before ``since``."""
    lo, until = _bounds(since, horizon)
    return map(_public, _window_spans(cal, lo, until))


def allowed_intervals(
    cal: Calendar, since: datetime, horizon: timedelta = DEFAULT_HORIZON
) -> Iterator[Interval]:
    """The intervals in which the node may start work: inside a window, in no freeze,
    not before the start time. Same bounds as window_intervals."""
    lo, until = _bounds(since, horizon)
    # Freezes are looked up as far back as a window still open at ``since`` may have
    # opened (so its reported start is right) and as far ahead as a window opening just
    # before the horizon may run.
    longest = max((w.duration for w in cal.windows), default=timedelta(0))
    blocked = _blocked_spans(cal, lo - longest, until + longest)
    pieces = _minus(_window_spans(cal, lo, until), blocked)
    return (_public(p) for p in pieces if p[1] > lo)


def frozen_by(cal: Calendar, now: datetime) -> tuple[Freeze, ...]:
    """The freezes holding the node at ``now``."""
    now = _utc(now, "now")
    return tuple(
        f
        for f in cal.freezes
        if any(s <= now < e for s, e in _freeze_spans(f, cal.zone, now, now + _TICK))
    )


Reason = Literal["open", "before-start", "outside-window", "frozen"]


@dataclass(frozen=True)
class Verdict:
    """May the node start work at ``now``, and if not, why and until when.

    ``window`` is the allowed interval containing ``now`` (when allowed): its end is when
    the node must stop starting work, the window's end or a freeze's start, whichever
    comes first. ``next_window`` is the next allowed interval after that (None: none
    within the horizon)."""

    allowed: bool
    reason: Reason
    window: Interval | None
    next_window: Interval | None
    frozen_by: tuple[str, ...] = field(default=())


def check(cal: Calendar, now: datetime, horizon: timedelta = DEFAULT_HORIZON) -> Verdict:
    now = _utc(now, "now")
    ahead = allowed_intervals(cal, now, horizon)
    first = next(ahead, None)
    if first is not None and now in first:
        return Verdict(True, "open", first, next(ahead, None))
    frozen = tuple(f.name for f in frozen_by(cal, now))
    reason: Reason
    if cal.start_at is not None and now < cal.start_at:
        reason = "before-start"
    elif not any(now in w for w in _first(window_intervals(cal, now, horizon))):
        reason = "outside-window"
    else:
        reason = "frozen"
    return Verdict(False, reason, None, first, frozen)


def _first(intervals: Iterator[Interval]) -> list[Interval]:
    first = next(intervals, None)
    return [] if first is None else [first]


def may_start(cal: Calendar, now: datetime) -> bool:
    """Is ``now`` inside one of the node's windows, in no freeze, not before the start?"""
    return check(cal, now).allowed


def current_window(cal: Calendar, now: datetime) -> Interval | None:
    """The allowed interval containing ``now``; its end is when starting work must stop."""
    return check(cal, now).window


def next_window(
    cal: Calendar, now: datetime, horizon: timedelta = DEFAULT_HORIZON
) -> Interval | None:
    """The first allowed interval opening after ``now`` (after the current one, if open)."""
    return check(cal, now, horizon).next_window


def upcoming(
    cal: Calendar, now: datetime, count: int, horizon: timedelta = DEFAULT_HORIZON
) -> list[Interval]:
    """The current allowed interval (if any) and the next ones: ``count`` at most, for a
    preview of when work will run."""
    if count < 0:
        raise ScheduleError(f"count must be >= 0, got {count}")
    out: list[Interval] = []
    for interval in allowed_intervals(cal, now, horizon):
        if len(out) == count:
            break
        out.append(interval)
    return out


def bake_end(intervals: Iterable[Interval], t0: datetime, bake: timedelta) -> datetime | None:
    """When a bake of ``bake`` that starts at ``t0`` ends, counting time only inside
    ``intervals`` (sorted, not overlapping); None if they run out first. Time before t0
    does not count; a bake started outside every interval begins at the next one."""
    t0 = _utc(t0, "t0")
    if bake <= timedelta(0):
        return t0
    remaining = bake
    for interval in intervals:
        if interval.end is not None and interval.end <= t0:
            continue
        start = max(interval.start, t0)
        if interval.end is None or start + remaining <= interval.end:
            return start + remaining
        remaining -= interval.end - start
    return None


def bake_end_in_windows(
    cal: Calendar, t0: datetime, bake: timedelta, horizon: timedelta = DEFAULT_HORIZON
) -> datetime | None:
    """``bakeInWindowsOnly``: a bake counted only while one of the node's windows is open.
    Freezes do not stop the clock: they hold new work, not the watching of work done."""
    return bake_end(window_intervals(cal, t0, horizon), t0, bake)


@dataclass(frozen=True)
class CatchUp:
    """What happened between two evaluations (``last`` and ``now``), for the caller to
    act on once. ``opened``: an allowed interval that opened after ``last`` and is still
    open at ``now``: start work in it, once. ``missed``: intervals that opened and closed
    entirely in between (the controller was down): they are not replayed; record them in
    one event. ``missed_total`` counts them all; ``missed`` keeps the first MAX_MISSED."""

    opened: Interval | None
    missed: tuple[Interval, ...]
    missed_total: int


def catch_up(cal: Calendar, last: datetime, now: datetime) -> CatchUp:
    last, now = _utc(last, "last"), _utc(now, "now")
    if now < last:
        raise ScheduleError(f"now ({now}) is before the last evaluation ({last})")
    opened: Interval | None = None
    missed: list[Interval] = []
    total = 0
    for interval in allowed_intervals(cal, last, now - last + _TICK):
        if interval.start > now:
            break
        if interval.start <= last:
            continue  # already open at the last evaluation: nothing new
        if now in interval:
            opened = interval
            break
        total += 1
        if len(missed) < MAX_MISSED:
            missed.append(interval)
    return CatchUp(opened, tuple(missed), total)


def earliest_start(
    cal: Calendar, t: datetime, horizon: timedelta = DEFAULT_HORIZON
) -> datetime | None:
    """The first instant at or after ``t`` at which the node may start work."""
    verdict = check(cal, t, horizon)
    if verdict.allowed:
        return _utc(t, "t")
    return None if verdict.next_window is None else verdict.next_window.start


@dataclass(frozen=True)
class WaveForecast:
    """When a wave is expected to run: ``starts[i]`` is when the nodes of the wave's i-th
    calendar may first start; ``finished`` when the last of them is expected done;
    ``baked`` when its bake ends and the next wave may begin. None: not within the
    horizon (and so nothing after it either)."""

    starts: tuple[datetime | None, ...]
    finished: datetime | None
    baked: datetime | None


def forecast(
    waves: Sequence[Sequence[Calendar]],
    bakes: Sequence[timedelta],
    now: datetime,
    *,
    node_time: timedelta = timedelta(0),
    bake_in_windows_only: bool = False,
    horizon: timedelta = DEFAULT_HORIZON,
) -> list[WaveForecast]:
    """A dry-run's timeline: each wave begins when the one before it has baked; within a
    wave, the nodes of each calendar start at its first allowed instant and take
    ``node_time`` (an estimate: no capacity limit is modelled). With
    ``bake_in_windows_only`` a wave's bake ends once it has run inside the windows of
    every calendar in the wave. Give one calendar per distinct (zone, freezes) group, not
    one per node: the cost is per calendar."""
    if len(bakes) != len(waves):
        raise ScheduleError(f"{len(waves)} waves but {len(bakes)} bake times")
    out: list[WaveForecast] = []
    begin: datetime | None = _utc(now, "now")
    for cals, bake in zip(waves, bakes, strict=True):
        if begin is None:
            out.append(WaveForecast(tuple(None for _ in cals), None, None))
            continue
        starts = tuple(earliest_start(cal, begin, horizon) for cal in cals)
        finished = _latest((None if s is None else s + node_time for s in starts), begin)
        baked: datetime | None
        if finished is None:
            baked = None
        elif bake_in_windows_only:
            ends = (bake_end_in_windows(cal, finished, bake, horizon) for cal in cals)
            baked = _latest(ends, finished if cals else finished + bake)
        else:
            baked = finished + bake
        out.append(WaveForecast(starts, finished, baked))
        begin = baked
    return out


def _latest(times: Iterable[datetime | None], floor: datetime) -> datetime | None:
    """The latest of ``times`` and ``floor``; None if any of them is None."""
    latest = floor
    for t in times:
        if t is None:
            return None
        latest = max(latest, t)
    return latest
