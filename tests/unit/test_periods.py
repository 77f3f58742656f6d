"""UTC days and months, the one owner of period boundaries: tables across a month end, a year
end and a leap day, at offsets that move an instant across them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from llm_usage.domain.budgets import BudgetWindow, period_end, period_start
from llm_usage.domain.periods import (
    InvalidPeriodError,
    current_period,
    first_open_after,
    following_period,
    month_end,
    month_has_ended,
    parse_period,
    start_of_month,
    utc_day,
)
from tests.clock import calendar_edges


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("moment", "day", "month"),
    [
        ("2027-01-31T23:59:59.999999+00:00", date(2027, 1, 31), date(2027, 1, 1)),
        ("2027-01-31T23:30:00-01:00", date(2027, 2, 1), date(2027, 2, 1)),
        ("2027-02-01T00:30:00+01:00", date(2027, 1, 31), date(2027, 1, 1)),
        ("2026-12-31T23:59:59+00:00", date(2026, 12, 31), date(2026, 12, 1)),
        ("2027-01-01T09:00:00+14:00", date(2026, 12, 31), date(2026, 12, 1)),
        ("2026-12-31T14:00:00-10:00", date(2027, 1, 1), date(2027, 1, 1)),
        ("2028-02-29T00:00:00+00:00", date(2028, 2, 29), date(2028, 2, 1)),
        ("2028-02-28T23:00:00-01:00", date(2028, 2, 29), date(2028, 2, 1)),
        ("2028-03-01T00:59:00+01:00", date(2028, 2, 29), date(2028, 2, 1)),
    ],
    ids=[
        "month-end-last-instant",
        "month-end-west-of-utc",
        "month-end-east-of-utc",
        "year-end-last-second",
        "year-end-kiribati",
        "year-end-hawaii",
        "leap-day",
        "leap-day-west-of-utc",
        "leap-day-east-of-utc",
    ],
)
def test_an_instant_belongs_to_its_utc_day_and_month(moment: str, day: date, month: date) -> None:
    instant = _at(moment)
    assert utc_day(instant) == day
    assert period_start(BudgetWindow.DAILY, instant) == day
    assert period_start(BudgetWindow.MONTHLY, instant) == month
    assert start_of_month(instant) == datetime.combine(month, datetime.min.time(), UTC)
    assert current_period(instant) == f"{month:%Y-%m}"


@pytest.mark.parametrize(
    ("day", "last"),
    [
        (date(2027, 1, 15), date(2027, 1, 31)),
        (date(2026, 12, 1), date(2026, 12, 31)),
        (date(2028, 2, 1), date(2028, 2, 29)),
        (date(2027, 2, 1), date(2027, 2, 28)),
        (date(2100, 2, 1), date(2100, 2, 28)),  # not a leap year: divisible by 100
        (date(2000, 2, 1), date(2000, 2, 29)),  # a leap year: divisible by 400
        (date(2026, 4, 30), date(2026, 4, 30)),
    ],
)
def test_a_month_ends_on_its_last_day(day: date, last: date) -> None:
    assert month_end(day) == last
    assert period_end(BudgetWindow.MONTHLY, day.replace(day=1)) == last
    assert period_end(BudgetWindow.DAILY, day) == day


def test_a_naive_time_has_no_period() -> None:
    with pytest.raises(ValueError, match="naive"):
        utc_day(datetime(2026, 12, 31, 23, 0))  # noqa: DTZ001 - the naive time is the point


@pytest.mark.parametrize(
    ("period", "closed", "expected"),
    [
        ("2026-10", set(), "2026-11"),
        ("2026-10", {"2026-10", "2026-11"}, "2026-12"),
        ("2026-12", {"2026-12", "2027-01"}, "2027-02"),
    ],
)
def test_first_open_after(period: str, closed: set[str], expected: str) -> None:
    assert first_open_after(period, closed) == expected


def test_periods() -> None:
    assert following_period("2026-12") == "2027-01"
    assert parse_period("2026-02").isoformat() == "2026-02-01"
    for bad in ("2026-13", "2026-1", "26-01", "2026-00", "november"):
        with pytest.raises(InvalidPeriodError, match="YYYY-MM"):
            parse_period(bad)


@pytest.mark.parametrize(
    ("period", "now", "ended"),
    [
        ("2026-10", "2026-11-01T00:00:00+00:00", True),
        ("2026-11", "2026-11-30T23:59:00+00:00", False),
        ("2026-12", "2027-01-01T00:00:00+00:00", True),
        ("2026-12", "2027-01-01T00:30:00+01:00", False),  # still 31 December in UTC
        ("2028-02", "2028-02-29T23:59:59+00:00", False),
        ("2028-02", "2028-03-01T00:00:00+00:00", True),
    ],
)
def test_a_month_has_ended_once_utc_is_past_it(period: str, now: str, ended: bool) -> None:
    assert month_has_ended(period, _at(now)) is ended


def test_every_instant_of_a_leap_year_falls_in_the_month_that_contains_it() -> None:
    moment = datetime(2028, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    while moment.year < 2029:
        day = utc_day(moment)
        assert start_of_month(moment).date() <= day <= month_end(day)
        moment += timedelta(hours=7, minutes=13)


@pytest.mark.parametrize(
    ("today", "edges"),
    [
        (date(2026, 12, 6), [date(2026, 12, 31), date(2027, 1, 31), date(2028, 2, 29)]),
        (date(2026, 12, 31), [date(2027, 1, 31), date(2027, 12, 31), date(2028, 2, 29)]),
        (date(2028, 1, 10), [date(2028, 2, 29), date(2028, 12, 31)]),
        (date(2028, 2, 29), [date(2028, 3, 31), date(2028, 12, 31), date(2032, 2, 29)]),
    ],
)
def test_the_calendar_runs_move_the_clock_ahead_to_a_month_end_a_year_end_and_a_leap_day(
    today: date, edges: list[date]
) -> None:
    moments = calendar_edges(today)
    assert [moment.date() for moment in moments] == edges
    assert all(moment.date() > today for moment in moments)
