"""Cron validation and DST-correct next runs (pure: no database, no network).

Wall-clock semantics in the schedule's timezone (contract §2, issue 4): when clocks spring
forward a run in the skipped hour happens at the first valid time after it (never lost);
when clocks fall back a repeated wall-clock time fires once (never twice).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from hexa.hub.errors import ValidationFailed
from hexa.hub.schedules import check_cron, check_timezone, next_run

# 2025 changes: Berlin 30 Mar 02:00→03:00 and 26 Oct 03:00→02:00 (02:xx repeats);
# New York 9 Mar 02:00→03:00 and 2 Nov 02:00→01:00 (01:xx repeats).
BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def runs(expr: str, tz_name: str, start: datetime, count: int) -> list[tuple[datetime, str]]:
    """The next ``count`` runs after ``start``, chained the way the scheduler chains them."""
    tz = ZoneInfo(tz_name)
    out: list[tuple[datetime, str]] = []
    after, last = start, None
    for _ in range(count):
        got = next_run(expr, tz, after, last)
        assert got is not None, (expr, tz_name, after)
        instant, key = got
        assert instant.tzinfo is not None and instant.utcoffset() == timedelta(0)
        assert instant > after
        out.append((instant, key))
        after, last = instant, key
    return out


def local(instant: datetime, tz_name: str) -> str:
    """The wall-clock reading of a UTC instant in a zone, to the minute."""
    return instant.astimezone(ZoneInfo(tz_name)).strftime("%Y-%m-%dT%H:%M")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# --- check_cron / check_timezone -------------------------------------------------------
@pytest.mark.parametrize(
    "expr",
    ["0 0 * * *", "*/15 * * * *", "30 2 * * 1-5", "0 7 1 * *", "0 0 29 2 *", "@daily", "@hourly"],
)
def test_check_cron_accepts_valid(expr: str) -> None:
    """Five-field crons and @-shortcuts that fire are accepted."""
    check_cron(expr, "UTC")
    check_cron(expr, BERLIN)


@pytest.mark.parametrize(
    "expr",
    [
        "* * * * * *",  # six fields (seconds)
        "0 0 * * * 2030",  # six fields (year)
        "* * * *",  # four fields
        "61 * * * *",  # minute out of range
        "0 24 * * *",  # hour out of range
        "0 0 * * 8",  # weekday out of range
        "0 0 0 * *",  # day 0
        "0 0 * 13 *",  # month 13
        "0 0 31 2 *",  # 31 February never fires
        "0 0 30 2 *",  # 30 February never fires
        "0 0 31 4 *",  # 31 April never fires
        "garbage",
        "a b c d e",
        "",
        "   ",
        "@nope",
    ],
)
def test_check_cron_rejects_invalid(expr: str) -> None:
    """Bad field counts, out-of-range fields, impossible dates and garbage: ValidationFailed."""
    with pytest.raises(ValidationFailed):
        check_cron(expr, "UTC")


def test_check_cron_rejects_unknown_timezone() -> None:
    """A valid cron in an unknown timezone raises ValidationFailed."""
    with pytest.raises(ValidationFailed):
        check_cron("0 0 * * *", "Mars/Olympus_Mons")


@pytest.mark.parametrize(
    "name", ["Mars/Olympus_Mons", "Europe/Atlantis", "", "../etc/passwd", "UTC+2"]
)
def test_check_timezone_rejects_unknown(name: str) -> None:
    """Names that are not IANA zones raise ValidationFailed."""
    with pytest.raises(ValidationFailed):
        check_timezone(name)


@pytest.mark.parametrize("name", ["UTC", BERLIN, NEW_YORK, "Asia/Kolkata"])
def test_check_timezone_accepts_iana(name: str) -> None:
    """IANA zone names are accepted and returned as a ZoneInfo."""
    assert check_timezone(name) == ZoneInfo(name)


# --- next_run basics --------------------------------------------------------------------
def test_next_run_is_aware_utc_and_strictly_after() -> None:
    """The next run is aware UTC and strictly after ``after``, even when ``after`` is a run time."""
    on_the_dot = utc(2025, 6, 10, 7, 0)
    got = next_run("0 7 * * *", ZoneInfo("UTC"), on_the_dot, None)
    assert got is not None
    instant, key = got
    assert instant.tzinfo is not None and instant.utcoffset() == timedelta(0)
    assert instant == utc(2025, 6, 11, 7, 0) and key == "2025-06-11T07:00"
    every_minute = next_run("* * * * *", ZoneInfo(BERLIN), on_the_dot, None)
    assert every_minute is not None and every_minute[0] == utc(2025, 6, 10, 7, 1)
    half_second = next_run(
        "* * * * *", ZoneInfo("UTC"), utc(2025, 6, 10, 7, 0) + timedelta(seconds=0.5), None
    )
    assert half_second is not None and half_second[0] == utc(2025, 6, 10, 7, 1)


@pytest.mark.parametrize(
    ("tz_name", "expected_utc"),
    [
        (BERLIN, utc(2025, 6, 10, 0, 30)),
        (NEW_YORK, utc(2025, 6, 10, 6, 30)),
        ("UTC", utc(2025, 6, 10, 2, 30)),
    ],
)
def test_next_run_is_in_the_schedules_timezone(tz_name: str, expected_utc: datetime) -> None:
    """02:30 daily means 02:30 on the wall clock of the schedule's zone."""
    ((instant, key),) = runs("30 2 * * *", tz_name, utc(2025, 6, 9, 12, 0), 1)
    assert instant == expected_utc and key == "2025-06-10T02:30"


# --- spring forward ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tz_name", "day", "fires_utc"),
    [(BERLIN, 30, utc(2025, 3, 30, 1, 0)), (NEW_YORK, 9, utc(2025, 3, 9, 7, 0))],
)
def test_spring_forward_run_in_skipped_hour_is_not_lost(
    tz_name: str, day: int, fires_utc: datetime
) -> None:
    """02:30 daily on the spring-forward day fires at 03:00 local; the days around are unchanged."""
    seq = runs("30 2 * * *", tz_name, utc(2025, 3, day - 2, 12, 0), 4)
    days = [local(i, tz_name)[:10] for i, _ in seq]
    change = utc(2025, 3, day)
    assert days == [(change + timedelta(days=d)).strftime("%Y-%m-%d") for d in (-1, 0, 1, 2)]
    assert local(seq[0][0], tz_name).endswith("T02:30")
    assert seq[1][0] == fires_utc and local(fires_utc, tz_name) == f"2025-03-{day:02d}T03:00"
    assert local(seq[2][0], tz_name).endswith("T02:30")
    assert local(seq[3][0], tz_name).endswith("T02:30")


@pytest.mark.parametrize(("tz_name", "day"), [(BERLIN, 30), (NEW_YORK, 9)])
def test_spring_forward_hourly_loses_no_real_hour(tz_name: str, day: int) -> None:
    """Hourly across spring-forward: one run per real hour, wall clock jumps 01:00 to 03:00."""
    start = datetime(2025, 3, day, 0, 0, tzinfo=ZoneInfo(tz_name)).astimezone(UTC)
    seq = runs("0 * * * *", tz_name, start - timedelta(minutes=1), 5)
    instants = [i for i, _ in seq]
    assert instants == [start + timedelta(hours=h) for h in range(5)]
    assert [local(i, tz_name)[11:] for i in instants] == [
        "00:00",
        "01:00",
        "03:00",
        "04:00",
        "05:00",
    ]


# --- fall back --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tz_name", "day", "hhmm", "fires_utc"),
    [
        (BERLIN, 26, "02:30", utc(2025, 10, 26, 0, 30)),  # first 02:30 (CEST)
        (NEW_YORK, 2, "01:30", utc(2025, 11, 2, 5, 30)),  # first 01:30 (EDT)
    ],
)
def test_fall_back_repeated_time_fires_once(
    tz_name: str, day: int, hhmm: str, fires_utc: datetime
) -> None:
    """A daily run at a wall-clock time that repeats on fall-back day fires once, not twice."""
    hour, minute = (int(x) for x in hhmm.split(":"))
    month = 10 if tz_name == BERLIN else 11
    start = datetime(2025, month, day, 0, 0, tzinfo=UTC) - timedelta(days=2)
    seq = runs(f"{minute} {hour} * * *", tz_name, start, 4)
    days = [local(i, tz_name)[:10] for i, _ in seq]
    assert len(set(days)) == 4, seq  # one run per calendar day, none doubled
    change_day = [i for i, _ in seq if local(i, tz_name).startswith(f"2025-{month:02d}-{day:02d}")]
    assert change_day == [fires_utc]
    assert all(local(i, tz_name).endswith(hhmm) for i, _ in seq)
    # the day after the change: same wall-clock time, one hour later in UTC than the day before
    after_change = seq[days.index(f"2025-{month:02d}-{day + 1:02d}")][0]
    assert after_change - fires_utc == timedelta(hours=25)


@pytest.mark.parametrize(
    ("tz_name", "local_midnight_utc", "repeated"),
    [(BERLIN, utc(2025, 10, 25, 22, 0), "02"), (NEW_YORK, utc(2025, 11, 2, 4, 0), "01")],
)
def test_fall_back_hourly_fires_once_per_wall_clock_hour(
    tz_name: str, local_midnight_utc: datetime, repeated: str
) -> None:
    """Hourly across fall-back: each wall-clock hour fires exactly once (the repeated one too)."""
    seq = runs("0 * * * *", tz_name, local_midnight_utc - timedelta(minutes=1), 7)
    readings = [local(i, tz_name)[11:] for i, _ in seq]
    assert readings == ["00:00", "01:00", "02:00", "03:00", "04:00", "05:00", "06:00"]
    keys = [k for _, k in seq]
    assert keys == sorted(set(keys))
    assert sum(1 for r in readings if r.startswith(repeated)) == 1


@pytest.mark.parametrize(
    ("tz_name", "local_midnight_utc", "repeated"),
    [(BERLIN, utc(2025, 10, 25, 22, 0), "02"), (NEW_YORK, utc(2025, 11, 2, 4, 0), "01")],
)
def test_fall_back_every_15_minutes_fires_once_per_wall_clock_quarter(
    tz_name: str, local_midnight_utc: datetime, repeated: str
) -> None:
    """*/15 across fall-back: each wall-clock quarter hour fires exactly once."""
    seq = runs("*/15 * * * *", tz_name, local_midnight_utc - timedelta(minutes=1), 20)
    readings = [local(i, tz_name)[11:] for i, _ in seq]
    expected = [f"{h:02d}:{m:02d}" for h in range(5) for m in (0, 15, 30, 45)]
    assert readings == expected
    assert [r for r in readings if r.startswith(repeated)] == [
        f"{repeated}:00",
        f"{repeated}:15",
        f"{repeated}:30",
        f"{repeated}:45",
    ]
    instants = [i for i, _ in seq]
    assert instants == sorted(set(instants))


def test_fall_back_inside_repeated_hour_does_not_refire() -> None:
    """Chained from the first 02:30 (CEST), the second 02:30 (CET) is skipped: next is 03:00 CET."""
    tz = ZoneInfo(BERLIN)
    first = next_run("30 * * * *", tz, utc(2025, 10, 26, 0, 0), None)
    assert first is not None and first == (utc(2025, 10, 26, 0, 30), "2025-10-26T02:30")
    second = next_run("30 * * * *", tz, first[0], first[1])
    assert second is not None and second[0] == utc(2025, 10, 26, 2, 30)
    assert second[1] == "2025-10-26T03:30"


# --- unaffected cases -------------------------------------------------------------------
@pytest.mark.parametrize("when", [(2025, 3, 28), (2025, 10, 24), (2025, 11, 1)])
def test_utc_schedules_ignore_dst_changes(when: tuple[int, int, int]) -> None:
    """In UTC, 02:30 daily is exactly 24 h apart across every local DST change date."""
    seq = runs("30 2 * * *", "UTC", utc(*when, 12, 0), 5)
    instants = [i for i, _ in seq]
    assert [b - a for a, b in itertools.pairwise(instants)] == [timedelta(days=1)] * 4
    assert all(i.hour == 2 and i.minute == 30 for i in instants)


@pytest.mark.parametrize("tz_name", [BERLIN, NEW_YORK])
def test_normal_days_are_24_hours_apart(tz_name: str) -> None:
    """Away from DST changes a local daily schedule runs every 24 h at the same wall-clock time."""
    seq = runs("30 2 * * *", tz_name, utc(2025, 6, 1, 12, 0), 10)
    instants = [i for i, _ in seq]
    assert [b - a for a, b in itertools.pairwise(instants)] == [timedelta(days=1)] * 9
    assert all(local(i, tz_name).endswith("T02:30") for i in instants)


def test_weekday_schedule_in_local_zone() -> None:
    """Day-of-week is evaluated on the local date (Mon 00:30 Berlin is Sunday 22:30 UTC)."""
    ((instant, key),) = runs("30 0 * * 1", BERLIN, utc(2025, 6, 4, 12, 0), 1)
    assert instant == utc(2025, 6, 8, 22, 30) and key == "2025-06-09T00:30"
