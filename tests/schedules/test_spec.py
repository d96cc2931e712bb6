"""controller/schedules/spec.py: the ``schedule`` and ``FreezePeriod`` fields refuse what
they cannot mean, each error naming its field and the expected form, and turn what they
accept into windows.py's values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from controller.schedules.spec import (
    MAX_WINDOWS,
    FreezePeriod,
    Schedule,
    to_calendar,
    to_freeze,
    to_windows,
)
from controller.schedules.windows import TIMEZONE_LABEL, Interval, ScheduleError, Window, check


def error(model: type[Schedule] | type[FreezePeriod], data: dict[str, Any]) -> tuple[Any, str]:
    """The location and message of the only error ``data`` raises."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    return errors[0]["loc"], errors[0]["msg"]


NIGHT = {"cron": "0 1 * * *", "duration": "4h"}


def test_schedule_accepted_and_converted() -> None:
    schedule = Schedule.model_validate(
        {
            "startAt": "2026-12-01T02:00:00+01:00",
            "timeZone": "Europe/Berlin",
            "windows": [NIGHT, {"cron": "0  22 * *   SAT", "duration": "1h30m"}],
            "bakeInWindowsOnly": True,
        }
    )
    assert schedule.startAt == datetime(2026, 12, 1, 1, tzinfo=UTC)
    assert to_windows(schedule) == (
        Window("0 1 * * *", timedelta(hours=4)),
        Window("0 22 * * SAT", timedelta(minutes=90)),
    )
    assert Schedule.model_validate({}).windows == []


def test_schedule_to_calendar() -> None:
    schedule = Schedule.model_validate({"startAt": "2026-01-14T00:00:00Z", "windows": [NIGHT]})
    freeze = to_freeze(
        FreezePeriod.model_validate(
            {
                "name": "lab-freeze",
                "start": "2026-01-01T00:00:00Z",
                "end": "2026-02-01T00:00:00Z",
                "selector": {"matchLabels": {"tier": "lab"}},
            }
        )
    )
    tokyo = {TIMEZONE_LABEL: "Asia.Tokyo", "tier": "retail"}
    cal = to_calendar(schedule, tokyo, [freeze])
    assert (cal.zone, cal.freezes) == (ZoneInfo("Asia/Tokyo"), ())
    # Tokyo's night of the 14th, 01:00-05:00 JST, is 13 Jan 16:00Z-20:00Z: before the start.
    verdict = check(cal, datetime(2026, 1, 13, 17, tzinfo=UTC))
    assert (verdict.allowed, verdict.reason) == (False, "before-start")
    assert verdict.next_window == Interval(
        datetime(2026, 1, 14, 16, tzinfo=UTC), datetime(2026, 1, 14, 20, tzinfo=UTC)
    )
    lab = to_calendar(schedule, {**tokyo, "tier": "lab"}, [freeze])
    assert lab.freezes == (freeze,)
    with pytest.raises(ScheduleError, match="no timeZone"):
        to_calendar(schedule, {"tier": "retail"})
    berlin = Schedule.model_validate({"timeZone": "Europe/Berlin", "windows": [NIGHT]})
    assert to_calendar(berlin, tokyo).zone == ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("cron", "says"),
    [
        ("61 1 * * *", "Bad minute"),
        ("0 25 * * *", "Bad hour"),
        ("0 1 32 * *", "Bad day-of-month"),
        ("0 1 * 13 *", "Bad month"),
        ("0 1 * * FUNDAY", "Bad day-of-week"),
        ("0 0 1 * * *", "has 6 fields; a cron expression has 5"),
        ("@daily", "has 1 fields"),
        ("*/5 * * * *", "opens more than 48 times a day"),
        ("*/5 * * 12 *", "opens more than 48 times a day"),  # only in December
        ("*/5 * 29 2 *", "opens more than 48 times a day"),  # only on 29 February
        ("*/29 * * * *", "opens more than 48 times a day"),  # 0, 29, 58: 72 a day
    ],
)
def test_bad_cron(cron: str, says: str) -> None:
    loc, msg = error(Schedule, {"windows": [{"cron": cron, "duration": "1h"}]})
    assert loc == ("windows", 0, "cron")
    assert says in msg


def test_every_half_hour_is_the_densest_window() -> None:
    for cron in ("*/30 * * * *", "*/5 1-4 * * *", "0 0 29 2 *"):
        Schedule.model_validate({"windows": [{"cron": cron, "duration": "10m"}]})


@pytest.mark.parametrize(
    ("duration", "says"),
    [
        ("30s", "out of range: a duration from 1m to 7d"),
        ("7d1m", "out of range"),
        ("0", "out of range"),
        ("forever", "is not a duration"),
    ],
)
def test_bad_window_duration(duration: str, says: str) -> None:
    loc, msg = error(Schedule, {"windows": [{"cron": "0 1 * * *", "duration": duration}]})
    assert loc == ("windows", 0, "duration")
    assert says in msg


def test_window_duration_bounds_are_inclusive() -> None:
    for duration in ("1m", "7d"):
        Schedule.model_validate({"windows": [{"cron": "0 1 * * *", "duration": duration}]})


@pytest.mark.parametrize(
    "zone",
    [
        "Mars/Olympus_Mons",
        "",
        "../../etc/passwd",
        "europe/berlin",
        "Europe",
        "zone.tab",
        "posixrules",
        "right/UTC",
        "posix/Europe/Berlin",
    ],
)
def test_unknown_time_zone(zone: str) -> None:
    loc, msg = error(Schedule, {"timeZone": zone})
    assert loc == ("timeZone",)
    assert "is not an IANA time zone name" in msg


def test_schedule_bounds_and_forms() -> None:
    loc, msg = error(Schedule, {"windows": [NIGHT] * (MAX_WINDOWS + 1)})
    assert loc == ("windows",)
    assert "at most 16" in msg
    loc, msg = error(Schedule, {"startAt": "2026-12-01T02:00:00"})
    assert loc == ("startAt",)
    assert "timezone" in msg
    loc, msg = error(Schedule, {"startAt": "next tuesday"})
    assert loc == ("startAt",)
    loc, _ = error(Schedule, {"windows": [{**NIGHT, "timezone": "UTC"}]})
    assert loc == ("windows", 0, "timezone")
    loc, _ = error(Schedule, {"window": [NIGHT]})
    assert loc == ("window",)
    loc, msg = error(Schedule, {"bakeInWindowsOnly": True})
    assert "bakeInWindowsOnly needs at least one window" in msg
    loc, _ = error(Schedule, {"windows": [{"cron": "x" * 101, "duration": "1h"}]})
    assert loc == ("windows", 0, "cron")


# ---------------------------------------------------------------- FreezePeriod


def test_fixed_freeze() -> None:
    spec = FreezePeriod.model_validate(
        {
            "name": "black-friday",
            "start": "2026-11-27T00:00:00-05:00",
            "end": "2026-11-30T00:00:00-05:00",
            "selector": {"matchLabels": {"tier": "retail"}},
            "reason": "peak trading",
        }
    )
    freeze = to_freeze(spec)
    assert freeze.when == Interval(
        datetime(2026, 11, 27, 5, tzinfo=UTC), datetime(2026, 11, 30, 5, tzinfo=UTC)
    )
    assert freeze.zone is None
    assert freeze.reason == "peak trading"
    assert freeze.applies({"tier": "retail", "site": "nyc-1"})
    assert not freeze.applies({"tier": "lab"})
    assert not freeze.applies({})


def test_recurring_freeze_fleet_wide() -> None:
    spec = FreezePeriod.model_validate(
        {"name": "holidays", "cron": "0 0 24 12 *", "duration": "3d", "timeZone": "Asia/Tokyo"}
    )
    freeze = to_freeze(spec)
    assert freeze.when == Window("0 0 24 12 *", timedelta(days=3))
    assert freeze.zone == ZoneInfo("Asia/Tokyo")
    assert freeze.applies({})


@pytest.mark.parametrize(
    ("data", "loc", "says"),
    [
        (
            {"start": "2026-11-30T00:00:00Z", "end": "2026-11-27T00:00:00Z"},
            ("end",),
            "end (2026-11-27T00:00:00+00:00) must be after start (2026-11-30T00:00:00+00:00)",
        ),
        (
            {"start": "2026-11-27T00:00:00+01:00", "end": "2026-11-26T23:00:00Z"},
            ("end",),
            "must be after start",
        ),
        ({"start": "2026-11-27T00:00:00Z"}, (), "needs both start and end"),
        ({"cron": "0 0 24 12 *"}, (), "needs both cron and duration"),
        ({}, (), "give either start and end"),
        (
            {"start": "2026-11-27T00:00:00Z", "end": "2026-11-28T00:00:00Z", "cron": "0 0 * * *"},
            (),
            "give either start and end",
        ),
        (
            {"start": "2026-01-01T00:00:00Z", "end": "2027-01-03T00:00:00Z"},
            (),
            "at most 366d",
        ),
        (
            {
                "start": "2026-11-27T00:00:00Z",
                "end": "2026-11-28T00:00:00Z",
                "timeZone": "Europe/Berlin",
            },
            (),
            "timeZone applies to a recurring freeze only",
        ),
        ({"cron": "0 0 24 12 *", "duration": "367d"}, ("duration",), "from 1m to 366d"),
        ({"cron": "0 0 24 12", "duration": "1d"}, ("cron",), "has 4 fields"),
        ({"cron": "0 0 * * *", "duration": "1d", "timeZone": "CEST"}, ("timeZone",), "IANA"),
        ({"start": "2026-11-27", "end": "2026-11-28T00:00:00Z"}, ("start",), "timezone"),
        (
            {"cron": "0 0 * * *", "duration": "1d", "selector": {"matchLabels": {"a/b/c": "x"}}},
            ("selector", "matchLabels", "a/b/c", "[key]"),
            "pattern",
        ),
        (
            {"cron": "0 0 * * *", "duration": "1d", "selector": {"tier": "retail"}},
            ("selector", "tier"),
            "Extra inputs",
        ),
        ({"cron": "0 0 * * *", "duration": "1d", "reason": "x" * 501}, ("reason",), "500"),
    ],
)
def test_bad_freeze(data: dict[str, Any], loc: tuple[Any, ...], says: str) -> None:
    got_loc, msg = error(FreezePeriod, {"name": "f", **data})
    assert got_loc == loc
    assert says in msg


def test_freeze_name_and_selector_bounds() -> None:
    loc, _ = error(FreezePeriod, {"name": "Not A Name", "cron": "0 0 * * *", "duration": "1d"})
    assert loc == ("name",)
    labels = {f"k{i}": "v" for i in range(33)}
    loc, msg = error(
        FreezePeriod,
        {"name": "f", "cron": "0 0 * * *", "duration": "1d", "selector": {"matchLabels": labels}},
    )
    assert loc == ("selector", "matchLabels")
    assert "at most 32" in msg
