"""Months as the rollup bills them: `YYYY-MM` in UTC. Pure functions, no clock of their own."""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import UTC, date, datetime

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


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


def next_month(first_day: date) -> date:
    return date(first_day.year + first_day.month // 12, first_day.month % 12 + 1, 1)


def following_period(period: str) -> str:
    return period_of(next_month(parse_period(period)))


def current_period(now: datetime) -> str:
    return period_of(now.astimezone(UTC).date())


def first_open_after(period: str, closed: Collection[str]) -> str:
    """The first month after `period` that is not closed: where its late events are billed."""
    candidate = following_period(period)
    while candidate in closed:
        candidate = following_period(candidate)
    return candidate


def month_has_ended(period: str, now: datetime) -> bool:
    """True once `now` (UTC) is past the last instant of `period`."""
    return period < current_period(now)
