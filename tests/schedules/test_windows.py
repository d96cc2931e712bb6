"""controller/schedules/windows.py with an injected ``now``: no clock, no sleeping.

Every expected instant is written out by hand from the zone's rules, with the local time
it stands for beside it, never computed by the code under test. The 2026 changes used:
Europe/Berlin CET (+01) to CEST (+02) on Sun 29 March at 02:00, back on Sun 25 October at
03:00; America/New_York EST (-05) to EDT (-04) on Sun 8 March at 02:00, back on Sun 1
November at 02:00; Pacific/Auckland NZDT (+13) to NZST (+12) on Sun 5 April at 03:00, and
NZST to NZDT on Sun 27 September at 02:00; Pacific/Kiritimati +14 all year; America/Adak
HDT (-09) from 8 March to 1 November; Asia/Tokyo +09 all year.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from controller.schedules.windows import (
    MAX_MISSED,
    TIMEZONE_LABEL,
    Calendar,
    Freeze,
    Interval,
    ScheduleError,
    WaveForecast,
    Window,
    bake_end,
    bake_end_in_windows,
    calendar_for,
    catch_up,
    check,
    current_window,
    forecast,
    frozen_by,
    may_start,
    next_window,
    upcoming,
    window_intervals,
    zone_from_label,
)

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def z(text: str) -> datetime:
    """An instant written in RFC 3339, e.g. '2026-03-29T01:00Z'."""
    return datetime.fromisoformat(text)


def iv(start: str, end: str) -> Interval:
    return Interval(z(start), z(end))


H = timedelta(hours=1)
NIGHT = Window("0 1 * * *", 4 * H)  # 01:00 to 05:00 local


# ---------------------------------------------------------------- DST: Europe/Berlin


def test_berlin_spring_forward_skipped_time_opens_at_first_real_minute() -> None:
    cal = Calendar(BERLIN, (Window("30 2 * * *", 2 * H),))
    assert upcoming(cal, z("2026-03-27T12:00Z"), 3) == [
        iv("2026-03-28T01:30Z", "2026-03-28T03:30Z"),  # 02:30 CET
        iv("2026-03-29T01:00Z", "2026-03-29T03:00Z"),  # no 02:30 that night: 03:00 CEST
        iv("2026-03-30T00:30Z", "2026-03-30T02:30Z"),  # 02:30 CEST
    ]


def test_berlin_duration_is_elapsed_time_across_spring_forward() -> None:
    cal = Calendar(BERLIN, (NIGHT,))
    # Opens 01:00 CET (00:00Z); four real hours later it is 06:00 CEST, not 05:00.
    assert current_window(cal, z("2026-03-29T00:30Z")) == iv(
        "2026-03-29T00:00Z", "2026-03-29T04:00Z"
    )
    assert may_start(cal, z("2026-03-29T03:59:59Z"))  # 05:59:59 CEST
    assert not may_start(cal, z("2026-03-29T04:00Z"))  # 06:00 CEST


def test_berlin_fall_back_repeated_time_opens_once_at_first_pass() -> None:
    cal = Calendar(BERLIN, (Window("30 2 * * *", 2 * H),))
    assert upcoming(cal, z("2026-10-23T12:00Z"), 3) == [
        iv("2026-10-24T00:30Z", "2026-10-24T02:30Z"),  # 02:30 CEST
        iv("2026-10-25T00:30Z", "2026-10-25T02:30Z"),  # the first 02:30 (CEST) only
        iv("2026-10-26T01:30Z", "2026-10-26T03:30Z"),  # 02:30 CET
    ]
    # The second 02:30 (CET, 01:30Z) opens nothing new: still the first window.
    verdict = check(cal, z("2026-10-25T01:45Z"))
    assert verdict.allowed
    assert verdict.window == iv("2026-10-25T00:30Z", "2026-10-25T02:30Z")
    assert not may_start(cal, z("2026-10-25T02:30Z"))  # 03:30 CET


def test_berlin_fall_back_wildcard_hour_matches_both_passes() -> None:
    cal = Calendar(BERLIN, (Window("0 * * * *", timedelta(minutes=30)),))
    assert upcoming(cal, z("2026-10-24T23:50Z"), 3) == [
        iv("2026-10-25T00:00Z", "2026-10-25T00:30Z"),  # 02:00 CEST
        iv("2026-10-25T01:00Z", "2026-10-25T01:30Z"),  # 02:00 CET, the same hour again
        iv("2026-10-25T02:00Z", "2026-10-25T02:30Z"),  # 03:00 CET
    ]


def test_berlin_spring_forward_wildcard_hour_skips_missing_hour() -> None:
    cal = Calendar(BERLIN, (Window("0 * * * *", timedelta(minutes=30)),))
    assert upcoming(cal, z("2026-03-28T23:50Z"), 3) == [
        iv("2026-03-29T00:00Z", "2026-03-29T00:30Z"),  # 01:00 CET
        iv("2026-03-29T01:00Z", "2026-03-29T01:30Z"),  # 03:00 CEST (02:00 never was)
        iv("2026-03-29T02:00Z", "2026-03-29T02:30Z"),  # 04:00 CEST
    ]


# ---------------------------------------------------------------- DST: America/New_York


def test_new_york_spring_forward() -> None:
    cal = Calendar(NEW_YORK, (Window("30 2 * * *", H),))
    assert upcoming(cal, z("2026-03-07T00:00Z"), 3) == [
        iv("2026-03-07T07:30Z", "2026-03-07T08:30Z"),  # 02:30 EST
        iv("2026-03-08T07:00Z", "2026-03-08T08:00Z"),  # no 02:30: 03:00 EDT
        iv("2026-03-09T06:30Z", "2026-03-09T07:30Z"),  # 02:30 EDT
    ]


def test_new_york_fall_back() -> None:
    cal = Calendar(NEW_YORK, (Window("30 1 * * *", H),))
    assert upcoming(cal, z("2026-10-31T00:00Z"), 3) == [
        iv("2026-10-31T05:30Z", "2026-10-31T06:30Z"),  # 01:30 EDT
        iv("2026-11-01T05:30Z", "2026-11-01T06:30Z"),  # the first 01:30, EDT
        iv("2026-11-02T06:30Z", "2026-11-02T07:30Z"),  # 01:30 EST
    ]
    # 06:30Z is the second 01:30 (EST): the window closes there, it does not reopen.
    assert not may_start(cal, z("2026-11-01T06:30Z"))
    assert next_window(cal, z("2026-11-01T06:30Z")) == iv("2026-11-02T06:30Z", "2026-11-02T07:30Z")


# ---------------------------------------------------------------- the date line


def test_auckland_dst_end_and_start() -> None:
    cal = Calendar(ZoneInfo("Pacific/Auckland"), (Window("0 2 * * *", 3 * H),))
    assert upcoming(cal, z("2026-04-03T00:00Z"), 3) == [
        iv("2026-04-03T13:00Z", "2026-04-03T16:00Z"),  # Sat 4 April 02:00 NZDT
        iv("2026-04-04T13:00Z", "2026-04-04T16:00Z"),  # Sun 5 April, first 02:00 (NZDT)
        iv("2026-04-05T14:00Z", "2026-04-05T17:00Z"),  # Mon 6 April 02:00 NZST
    ]
    cal = Calendar(ZoneInfo("Pacific/Auckland"), (Window("30 2 * * *", H),))
    assert upcoming(cal, z("2026-09-25T00:00Z"), 3) == [
        iv("2026-09-25T14:30Z", "2026-09-25T15:30Z"),  # Sat 26 Sept 02:30 NZST
        iv("2026-09-26T14:00Z", "2026-09-26T15:00Z"),  # Sun 27 Sept: no 02:30, 03:00 NZDT
        iv("2026-09-27T13:30Z", "2026-09-27T14:30Z"),  # Mon 28 Sept 02:30 NZDT
    ]


def test_kiritimati_and_adak_same_wall_clock_a_day_apart() -> None:
    # Mondays 01:00-05:00 local. Monday 15 June 2026 01:00 is Sunday 14 June 11:00Z on
    # Kiritimati (+14) and Monday 15 June 10:00Z on Adak (HDT, -09): 23 hours apart.
    monday_night = (Window("0 1 * * 1", 4 * H),)
    kiritimati = Calendar(ZoneInfo("Pacific/Kiritimati"), monday_night)
    adak = Calendar(ZoneInfo("America/Adak"), monday_night)
    now = z("2026-06-14T12:00Z")  # Mon 02:00 on Kiritimati, Sun 03:00 on Adak
    assert check(kiritimati, now).window == iv("2026-06-14T11:00Z", "2026-06-14T15:00Z")
    verdict = check(adak, now)
    assert not verdict.allowed
    assert verdict.reason == "outside-window"
    assert verdict.next_window == iv("2026-06-15T10:00Z", "2026-06-15T14:00Z")
    later = z("2026-06-15T11:00Z")  # Tue 01:00 on Kiritimati, Mon 02:00 on Adak
    assert may_start(adak, later)
    assert not may_start(kiritimati, later)
    assert next_window(kiritimati, later) == iv("2026-06-21T11:00Z", "2026-06-21T15:00Z")


# ---------------------------------------------------------------- three sites


def site(zone_label: str) -> dict[str, str]:
    return {TIMEZONE_LABEL: zone_label, "tier": "retail"}


SITES = {
    "berlin": site("Europe.Berlin"),  # +01 in January
    "new-york": site("America.New_York"),  # -05
    "tokyo": site("Asia.Tokyo"),  # +09
}


def test_three_sites_each_only_in_its_own_night() -> None:
    cals = {name: calendar_for(labels=labels, windows=[NIGHT]) for name, labels in SITES.items()}

    def open_at(text: str) -> set[str]:
        return {name for name, cal in cals.items() if may_start(cal, z(text))}

    assert open_at("2026-01-13T17:00Z") == {"tokyo"}  # Tokyo 02:00, Berlin 18:00, NY 12:00
    assert open_at("2026-01-14T02:00Z") == {"berlin"}  # Berlin 03:00, NY 21:00, Tokyo 11:00
    assert open_at("2026-01-14T07:00Z") == {"new-york"}  # NY 02:00, Berlin 08:00
    assert open_at("2026-01-14T12:00Z") == set()
    now = z("2026-01-14T02:00Z")
    assert {name: next_window(cal, now) for name, cal in cals.items()} == {
        "berlin": iv("2026-01-15T00:00Z", "2026-01-15T04:00Z"),
        "new-york": iv("2026-01-14T06:00Z", "2026-01-14T10:00Z"),
        "tokyo": iv("2026-01-14T16:00Z", "2026-01-14T20:00Z"),
    }


def test_three_sites_fleet_wide_freeze_blocks_all() -> None:
    freeze = Freeze("release-freeze", iv("2026-01-14T00:00Z", "2026-01-15T00:00Z"))
    cals = {
        name: calendar_for(labels=labels, windows=[NIGHT], freezes=[freeze])
        for name, labels in SITES.items()
    }
    for text in ("2026-01-14T02:00Z", "2026-01-14T07:00Z", "2026-01-14T17:00Z"):
        assert not any(may_start(cal, z(text)) for cal in cals.values())
    verdict = check(cals["berlin"], z("2026-01-14T02:00Z"))
    assert verdict.reason == "frozen"
    assert verdict.frozen_by == ("release-freeze",)
    # The freeze ends at midnight UTC, exactly when Berlin's next night opens.
    assert verdict.next_window == iv("2026-01-15T00:00Z", "2026-01-15T04:00Z")
    assert next_window(cals["new-york"], z("2026-01-14T02:00Z")) == iv(
        "2026-01-15T06:00Z", "2026-01-15T10:00Z"
    )


def test_node_without_zone_is_refused_not_read_as_utc() -> None:
    with pytest.raises(ScheduleError, match=TIMEZONE_LABEL):
        calendar_for(labels={"tier": "retail"}, windows=[NIGHT])
    # The rollout's zone wins over the label.
    cal = calendar_for(labels=SITES["tokyo"], windows=[NIGHT], zone=BERLIN)
    assert cal.zone == BERLIN


def test_zone_label_spelling() -> None:
    assert zone_from_label("America.New_York") == NEW_YORK
    assert zone_from_label("America/New_York") == NEW_YORK
    assert zone_from_label("America.Argentina.Buenos_Aires") == ZoneInfo(
        "America/Argentina/Buenos_Aires"
    )
    with pytest.raises(ScheduleError, match="not an IANA time zone"):
        zone_from_label("Mars.Olympus_Mons")


# ---------------------------------------------------------------- freezes


def test_overlapping_freezes() -> None:
    cal = Calendar(
        UTC_ZONE,
        (Window("0 1 * * *", 6 * H),),  # 01:00-07:00
        freezes=(
            Freeze("a", iv("2026-01-10T02:00Z", "2026-01-10T03:00Z")),
            Freeze("b", iv("2026-01-10T02:30Z", "2026-01-10T04:00Z")),
            Freeze("c", Window("0 5 * * *", timedelta(minutes=30))),  # 05:00-05:30 daily
        ),
    )
    assert upcoming(cal, z("2026-01-10T00:00Z"), 4) == [
        iv("2026-01-10T01:00Z", "2026-01-10T02:00Z"),
        iv("2026-01-10T04:00Z", "2026-01-10T05:00Z"),
        iv("2026-01-10T05:30Z", "2026-01-10T07:00Z"),
        iv("2026-01-11T01:00Z", "2026-01-11T05:00Z"),
    ]
    verdict = check(cal, z("2026-01-10T02:45Z"))
    assert (verdict.allowed, verdict.reason, verdict.frozen_by) == (False, "frozen", ("a", "b"))
    assert verdict.next_window == iv("2026-01-10T04:00Z", "2026-01-10T05:00Z")
    assert [f.name for f in frozen_by(cal, z("2026-01-10T03:15Z"))] == ["b"]
    # Inside a window, the current interval ends where the next freeze begins.
    verdict = check(cal, z("2026-01-10T01:30Z"))
    assert verdict.allowed
    assert verdict.window == iv("2026-01-10T01:00Z", "2026-01-10T02:00Z")
    assert verdict.next_window == iv("2026-01-10T04:00Z", "2026-01-10T05:00Z")


def test_freeze_that_ended_inside_the_current_window_moves_its_start() -> None:
    cal = Calendar(
        UTC_ZONE,
        (NIGHT,),
        freezes=(Freeze("short", iv("2026-01-10T00:30Z", "2026-01-10T01:20Z")),),
    )
    assert current_window(cal, z("2026-01-10T03:00Z")) == iv(
        "2026-01-10T01:20Z", "2026-01-10T05:00Z"
    )


def test_freeze_selector_and_node_zone() -> None:
    # A holiday freeze with no zone of its own follows each node's midnight.
    holidays = Freeze(
        "holidays",
        Window("0 0 24 12 *", 3 * 24 * H),
        applies=lambda labels: labels.get("tier") == "retail",
    )
    tokyo = calendar_for(labels=SITES["tokyo"], windows=[NIGHT], freezes=[holidays])
    # 24 Dec 00:00 JST is 23 Dec 15:00Z; three days later, 26 Dec 15:00Z. The nights of the
    # 24th, 25th and 26th (16:00Z the day before) are frozen; the 27th's is not.
    assert next_window(tokyo, z("2026-12-23T12:00Z")) == iv(
        "2026-12-26T16:00Z", "2026-12-26T20:00Z"
    )
    lab = calendar_for(
        labels={TIMEZONE_LABEL: "Asia.Tokyo", "tier": "lab"}, windows=[NIGHT], freezes=[holidays]
    )
    assert lab.freezes == ()
    assert next_window(lab, z("2026-12-23T12:00Z")) == iv("2026-12-23T16:00Z", "2026-12-23T20:00Z")
    # The same freeze on a New York node: 24 Dec 00:00 EST is 24 Dec 05:00Z.
    ny = calendar_for(labels=SITES["new-york"], windows=[NIGHT], freezes=[holidays])
    assert [f.name for f in frozen_by(ny, z("2026-12-24T05:00Z"))] == ["holidays"]
    assert frozen_by(ny, z("2026-12-24T04:59Z")) == ()


def test_freeze_everything_finds_nothing_within_horizon() -> None:
    cal = Calendar(UTC_ZONE, (NIGHT,), freezes=(Freeze("all", Window("0 0 * * *", 24 * H)),))
    verdict = check(cal, z("2026-01-10T02:00Z"), horizon=timedelta(days=30))
    assert (verdict.allowed, verdict.reason, verdict.next_window) == (False, "frozen", None)


# ---------------------------------------------------------------- start time, no windows


def test_start_time_gates_everything_before_it() -> None:
    cal = Calendar(UTC_ZONE, (NIGHT,), start_at=z("2026-01-12T02:00Z"))
    verdict = check(cal, z("2026-01-10T02:00Z"))
    assert (verdict.allowed, verdict.reason) == (False, "before-start")
    # The start falls inside the night of the 12th: that window opens at the start.
    assert verdict.next_window == iv("2026-01-12T02:00Z", "2026-01-12T05:00Z")
    assert may_start(cal, z("2026-01-12T02:00Z"))
    assert not may_start(cal, z("2026-01-12T01:59:59Z"))


def test_no_windows_means_any_time_after_start_outside_freezes() -> None:
    cal = Calendar(
        BERLIN,
        start_at=z("2026-01-10T08:00Z"),
        freezes=(Freeze("f", iv("2026-01-11T00:00Z", "2026-01-12T00:00Z")),),
    )
    assert not may_start(cal, z("2026-01-10T07:00Z"))
    verdict = check(cal, z("2026-01-10T09:00Z"))
    # Without windows there is no opening to look back to: the interval is reported from
    # the instant asked about.
    assert verdict.window == iv("2026-01-10T09:00Z", "2026-01-11T00:00Z")
    assert verdict.next_window == Interval(z("2026-01-12T00:00Z"), None)
    assert current_window(Calendar(BERLIN), z("2026-01-10T09:00Z")) == Interval(
        z("2026-01-10T09:00Z"), None
    )


def test_window_ending_mid_wave() -> None:
    cal = Calendar(UTC_ZONE, (NIGHT,))
    verdict = check(cal, z("2026-01-10T04:59Z"))
    assert verdict.allowed
    assert verdict.window is not None
    assert verdict.window.end == z("2026-01-10T05:00Z")
    verdict = check(cal, z("2026-01-10T05:00Z"))
    assert (verdict.allowed, verdict.reason) == (False, "outside-window")
    assert verdict.next_window == iv("2026-01-11T01:00Z", "2026-01-11T05:00Z")


def test_overlapping_windows_merge() -> None:
    cal = Calendar(UTC_ZONE, (NIGHT, Window("0 4 * * *", 2 * H), Window("0 6 * * *", H)))
    # 01-05, 04-06 and 06-07 touch or overlap: one interval, 01:00 to 07:00.
    assert upcoming(cal, z("2026-01-10T00:00Z"), 2) == [
        iv("2026-01-10T01:00Z", "2026-01-10T07:00Z"),
        iv("2026-01-11T01:00Z", "2026-01-11T07:00Z"),
    ]


def test_naive_now_is_refused() -> None:
    with pytest.raises(ScheduleError, match="timezone-aware"):
        may_start(Calendar(UTC_ZONE, (NIGHT,)), datetime(2026, 1, 10, 2))


# ---------------------------------------------------------------- bake


def test_bake_ends_after_time_inside_intervals_only() -> None:
    intervals = [
        iv("2026-01-10T01:00Z", "2026-01-10T05:00Z"),
        iv("2026-01-11T01:00Z", "2026-01-11T05:00Z"),
    ]
    # From 04:00, one hour before the window ends: 1h counted, 1h in the next window.
    assert bake_end(intervals, z("2026-01-10T04:00Z"), 2 * H) == z("2026-01-11T02:00Z")
    # Started outside every interval: counting begins at the next one.
    assert bake_end(intervals, z("2026-01-10T12:00Z"), timedelta(minutes=30)) == z(
        "2026-01-11T01:30Z"
    )
    # Ends exactly when a window closes.
    assert bake_end(intervals, z("2026-01-10T04:00Z"), H) == z("2026-01-10T05:00Z")
    assert bake_end(intervals, z("2026-01-10T04:00Z"), 6 * H) is None
    assert bake_end(intervals, z("2026-01-10T12:00Z"), timedelta(0)) == z("2026-01-10T12:00Z")


def test_bake_in_windows_across_spring_forward() -> None:
    cal = Calendar(BERLIN, (NIGHT,))
    # 28 March: 01:00-05:00 CET is 00:00Z-04:00Z; 29 March: 01:00 CET (00:00Z) for four
    # real hours. From 03:00Z on the 28th, 1h counts there and 2h the next night.
    assert bake_end_in_windows(cal, z("2026-03-28T03:00Z"), 3 * H) == z("2026-03-29T02:00Z")


def test_bake_in_windows_ignores_freezes() -> None:
    cal = Calendar(
        UTC_ZONE, (NIGHT,), freezes=(Freeze("f", iv("2026-01-10T00:00Z", "2026-01-11T00:00Z")),)
    )
    assert bake_end_in_windows(cal, z("2026-01-10T01:00Z"), H) == z("2026-01-10T02:00Z")


# ---------------------------------------------------------------- catch-up


def test_catch_up_after_outage_spanning_windows() -> None:
    cal = Calendar(UTC_ZONE, (NIGHT,))
    # Down from 10 Jan 00:30 to 12 Jan 02:00: the nights of the 10th and 11th opened and
    # closed unseen; the 12th's is open now.
    result = catch_up(cal, z("2026-01-10T00:30Z"), z("2026-01-12T02:00Z"))
    assert result.opened == iv("2026-01-12T01:00Z", "2026-01-12T05:00Z")
    assert result.missed == (
        iv("2026-01-10T01:00Z", "2026-01-10T05:00Z"),
        iv("2026-01-11T01:00Z", "2026-01-11T05:00Z"),
    )
    assert result.missed_total == 2
    # The next tick sees nothing new: the window counts once.
    again = catch_up(cal, z("2026-01-12T02:00Z"), z("2026-01-12T02:01Z"))
    assert (again.opened, again.missed, again.missed_total) == (None, (), 0)


def test_catch_up_across_one_boundary() -> None:
    cal = Calendar(UTC_ZONE, (NIGHT,))
    # Down from inside one night into the next: the first was seen open, so nothing was
    # missed; the second opened unseen and counts once.
    result = catch_up(cal, z("2026-01-10T04:30Z"), z("2026-01-11T01:30Z"))
    assert result.opened == iv("2026-01-11T01:00Z", "2026-01-11T05:00Z")
    assert result.missed == ()
    # Down from inside a night until after it closed: nothing opened, nothing missed.
    result = catch_up(cal, z("2026-01-10T02:00Z"), z("2026-01-10T06:00Z"))
    assert (result.opened, result.missed) == (None, ())
    # A window opening exactly at ``now`` is opened now.
    result = catch_up(cal, z("2026-01-10T06:00Z"), z("2026-01-11T01:00Z"))
    assert result.opened == iv("2026-01-11T01:00Z", "2026-01-11T05:00Z")


def test_catch_up_start_time_and_long_outage() -> None:
    cal = Calendar(UTC_ZONE, start_at=z("2026-01-10T03:00Z"))
    result = catch_up(cal, z("2026-01-10T02:00Z"), z("2026-01-10T04:00Z"))
    assert result.opened == Interval(z("2026-01-10T03:00Z"), None)
    hourly = Calendar(UTC_ZONE, (Window("0 * * * *", timedelta(minutes=30)),))
    # 1 Jan 00:10 to 11 Jan 00:10: the windows of 1 Jan 01:00 .. 10 Jan 23:00 (23 + 9 * 24)
    # were missed; 11 Jan 00:00 is open.
    result = catch_up(hourly, z("2026-01-01T00:10Z"), z("2026-01-11T00:10Z"))
    assert result.missed_total == 239
    assert len(result.missed) == MAX_MISSED
    assert result.missed[0] == iv("2026-01-01T01:00Z", "2026-01-01T01:30Z")
    assert result.opened == iv("2026-01-11T00:00Z", "2026-01-11T00:30Z")
    with pytest.raises(ScheduleError):
        catch_up(cal, z("2026-01-10T04:00Z"), z("2026-01-10T03:00Z"))


def test_window_intervals_ignore_freezes_and_start() -> None:
    cal = Calendar(
        UTC_ZONE,
        (NIGHT,),
        freezes=(Freeze("f", iv("2026-01-10T00:00Z", "2026-01-11T00:00Z")),),
        start_at=z("2026-01-12T00:00Z"),
    )
    it = window_intervals(cal, z("2026-01-10T02:00Z"))
    assert next(it) == iv("2026-01-10T01:00Z", "2026-01-10T05:00Z")


def test_asked_during_the_repeated_hour() -> None:
    # 01:10Z on 25 October is 02:10 CET, the second pass of 02:00-03:00. The 02:30 window
    # of that night opened at the first pass (00:30Z) and closed at 00:40Z: the next is
    # the 26th's 02:30 CET.
    cal = Calendar(BERLIN, (Window("30 2 * * *", timedelta(minutes=10)),))
    assert not may_start(cal, z("2026-10-25T01:10Z"))
    assert next_window(cal, z("2026-10-25T01:10Z")) == iv("2026-10-26T01:30Z", "2026-10-26T01:40Z")


def first_real_instant(day: date, hour: int, minute: int, zone: ZoneInfo) -> datetime:
    """Debian cron's reading of a fixed local time, from zoneinfo alone: the first pass of
    a repeated time (fold=0); for a skipped one, the first minute after the gap."""
    wall = datetime.combine(day, time(hour, minute))
    while True:
        t = wall.replace(tzinfo=zone)
        if t.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall:
            return t.astimezone(UTC)
        wall += timedelta(minutes=1)


@pytest.mark.parametrize(
    "zone",
    [
        "Europe/Berlin",
        "America/New_York",
        "Pacific/Auckland",
        "America/Adak",
        "Pacific/Kiritimati",
        "Australia/Lord_Howe",  # 30-minute DST shifts
        "Pacific/Chatham",  # +12:45 / +13:45
        "America/Santiago",
    ],
)
@pytest.mark.parametrize(("hour", "minute"), [(2, 15), (1, 30), (0, 0)])
def test_a_year_of_nightly_windows_against_zoneinfo(zone: str, hour: int, minute: int) -> None:
    tz = ZoneInfo(zone)
    cal = Calendar(tz, (Window(f"{minute} {hour} * * *", timedelta(minutes=20)),))
    days = [date(2026, 1, 1) + timedelta(days=i) for i in range(365)]
    expected = [first_real_instant(d, hour, minute, tz) for d in days]
    got = upcoming(cal, expected[0] - timedelta(seconds=1), len(days))
    assert [w.start for w in got] == expected


# ---------------------------------------------------------------- dry-run forecast


def three_site_waves(freezes: list[Freeze]) -> list[list[Calendar]]:
    cal = {
        name: calendar_for(labels=labels, windows=[NIGHT], freezes=freezes)
        for name, labels in SITES.items()
    }
    return [
        [cal["berlin"]],
        [cal["new-york"], cal["tokyo"]],
        [cal["berlin"], cal["new-york"], cal["tokyo"]],
    ]


BAKES = [H, 2 * H, timedelta(0)]
NODE_TIME = timedelta(minutes=30)


def test_forecast_three_sites() -> None:
    got = forecast(three_site_waves([]), BAKES, z("2026-01-13T12:00Z"), node_time=NODE_TIME)
    assert got == [
        # Berlin's night opens 14 Jan 00:00Z; done 00:30Z, baked 01:30Z.
        WaveForecast((z("2026-01-14T00:00Z"),), z("2026-01-14T00:30Z"), z("2026-01-14T01:30Z")),
        # From 01:30Z: New York at 06:00Z, Tokyo at 16:00Z (its night of the 13th is over).
        WaveForecast(
            (z("2026-01-14T06:00Z"), z("2026-01-14T16:00Z")),
            z("2026-01-14T16:30Z"),
            z("2026-01-14T18:30Z"),
        ),
        # From 18:30Z: Tokyo is still in its night; Berlin and New York the next.
        WaveForecast(
            (z("2026-01-15T00:00Z"), z("2026-01-15T06:00Z"), z("2026-01-14T18:30Z")),
            z("2026-01-15T06:30Z"),
            z("2026-01-15T06:30Z"),
        ),
    ]


def test_forecast_bake_in_windows_only() -> None:
    got = forecast(
        three_site_waves([]),
        BAKES,
        z("2026-01-13T12:00Z"),
        node_time=NODE_TIME,
        bake_in_windows_only=True,
    )
    # Wave 1 finishes 14 Jan 16:30Z: two window hours are 16:30-18:30Z in Tokyo but
    # 06:00-08:00Z on the 15th in New York; the later counts.
    assert [(w.finished, w.baked) for w in got] == [
        (z("2026-01-14T00:30Z"), z("2026-01-14T01:30Z")),
        (z("2026-01-14T16:30Z"), z("2026-01-15T08:00Z")),
        (z("2026-01-16T00:30Z"), z("2026-01-16T00:30Z")),
    ]
    assert got[2].starts == (z("2026-01-16T00:00Z"), z("2026-01-15T08:00Z"), z("2026-01-15T16:00Z"))


def test_forecast_with_freeze_and_beyond_horizon() -> None:
    freeze = Freeze("release-freeze", iv("2026-01-14T00:00Z", "2026-01-15T00:00Z"))
    got = forecast(three_site_waves([freeze]), BAKES, z("2026-01-13T12:00Z"), node_time=NODE_TIME)
    assert [w.starts for w in got] == [
        (z("2026-01-15T00:00Z"),),
        (z("2026-01-15T06:00Z"), z("2026-01-15T16:00Z")),
        (z("2026-01-16T00:00Z"), z("2026-01-16T06:00Z"), z("2026-01-15T18:30Z")),
    ]
    frozen = Freeze("forever", iv("2026-01-01T00:00Z", "2027-06-01T00:00Z"))
    got = forecast(three_site_waves([frozen]), BAKES, z("2026-01-13T12:00Z"))
    assert got[0] == WaveForecast((None,), None, None)
    assert got[2] == WaveForecast((None, None, None), None, None)


def run_with_clock(
    waves: list[list[Calendar]], bakes: list[timedelta], now: datetime, step: timedelta
) -> list[tuple[datetime, ...]]:
    """A toy engine driven by an injected clock, asking only may_start: each node group
    starts at the first tick it may, takes NODE_TIME, and the next wave begins after the
    bake. Returns when each group of each wave started."""
    out: list[tuple[datetime, ...]] = []
    t = now
    for cals, bake in zip(waves, bakes, strict=True):
        started: dict[int, datetime] = {}
        while len(started) < len(cals):
            ready = [i for i, cal in enumerate(cals) if i not in started and may_start(cal, t)]
            started |= dict.fromkeys(ready, t)
            t += step
        finished = max(started.values()) + NODE_TIME
        t = max(t, finished + bake)
        out.append(tuple(started[i] for i in range(len(cals))))
    return out


@pytest.mark.parametrize(
    "freezes", [[], [Freeze("f", iv("2026-01-14T00:00Z", "2026-01-15T00:00Z"))]]
)
def test_a_clock_driven_run_matches_the_forecast(freezes: list[Freeze]) -> None:
    waves = three_site_waves(freezes)
    now = z("2026-01-13T12:00Z")
    predicted = forecast(waves, BAKES, now, node_time=NODE_TIME)
    assert run_with_clock(waves, BAKES, now, timedelta(minutes=5)) == [w.starts for w in predicted]
