"""UTC days and calendar months: the one owner of where a day or a month begins and ends.

Budgets count spend per UTC day and month, the rollup bills `YYYY-MM` months, the API and the
page report "this month": all of them take their boundaries from here. Pure functions, no clock
of their own (callers pass `now`).
"""

from __future__ import annotations

import re
from calendar import monthrange
from collections.abc import Collection
from datetime import UTC, date, datetime, time

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def utc_day(moment: datetime) -> date:
    """The UTC calendar day `moment` falls in; a naive time is refused, being ambiguous."""
    if moment.tzinfo is None:
        raise ValueError("a period needs an aware datetime; naive times are ambiguous")
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.date()


def month_start(day: date) -> date:
    """The first day of `day`'s month."""
    return day.replace(day=1)


def month_end(day: date) -> date:
    """The last day of `day`'s month (the 29th of a leap February)."""
    return day.replace(day=monthrange(day.year, day.month)[1])


def start_of_month(now: datetime) -> datetime:
    """The first instant (UTC midnight) of the UTC month `now` falls in."""
    return datetime.combine(month_start(utc_day(now)), time(0), UTC)


class InvalidPeriodError(ValueError):
    """Not a `YYYY-MM` month."""


def parse_period(text: str) -> date:
    """The first day of the month `text` names (`2026-11` → 2026-11-01)."""
    match = _PERIOD.match(text)
    if match is None:
        raise InvalidPeriodError(f"{text!r} is not a month; give it as YYYY-MM, e.g. 2026-11")
    return date(int(match[1]), int(match[2]), 1)


def period_of(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def add_months(first_day: date, months: int) -> date:
    """The first day of the month `months` after (or before, if negative) `first_day`'s month."""
    index = first_day.year * 12 + first_day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def next_month(first_day: date) -> date:
    return date(first_day.year + first_day.month // 12, first_day.month % 12 + 1, 1)


def following_period(period: str) -> str:
    return period_of(next_month(parse_period(period)))


def current_period(now: datetime) -> str:
    return period_of(utc_day(now))


def first_open_after(period: str, closed: Collection[str]) -> str:
    """The first month after `period` that is not closed: where its late events are billed."""
    candidate = following_period(period)
    while candidate in closed:
        candidate = following_period(candidate)
    return candidate


def month_has_ended(period: str, now: datetime) -> bool:
    """True once `now` (UTC) is past the last instant of `period`."""
    return period < current_period(now)
