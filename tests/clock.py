"""The tests' "now" and the days and months relative to it.

"Now" is the workers' clock (`worker_clock()`), so the tests and the workers they spawn agree on
it; `LLM_USAGE_TEST_NOW` moves it for a whole run (tests/conftest.py). A test whose outcome
depends on the current day or month takes its dates from here, never from the calendar.
"""

from __future__ import annotations

import asyncio
from calendar import isleap
from datetime import UTC, date, datetime, time, timedelta

from llm_usage.core.clock import worker_clock
from llm_usage.domain.periods import month_end, month_start, utc_day


def now() -> datetime:
    """What the workers take as now (UTC): the run's simulated clock if it has one."""
    return worker_clock()().astimezone(UTC)


def today() -> date:
    """Now's UTC day."""
    return utc_day(now())


def this_month() -> date:
    """The first day of now's UTC month."""
    return month_start(today())


def month_of(moment: datetime) -> date:
    """The first day of `moment`'s UTC month."""
    return month_start(utc_day(moment))


def earlier_today() -> datetime:
    """An instant of now's UTC day (so of its month too) that is not after now."""
    moment = now()
    return max(moment - timedelta(seconds=1), datetime.combine(utc_day(moment), time(0), UTC))


def iso(moment: datetime) -> str:
    """`moment` as a gateway writes `occurred_at`: RFC 3339 in UTC, milliseconds, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def clear_of_midnight(margin: timedelta = timedelta(minutes=3)) -> None:
    """Return once now is at least `margin` before the next UTC midnight, sleeping past it if not.

    For a test that compares its dates with the workers' current day or month for up to `margin`:
    crossing midnight meanwhile would move the workers to another period.
    """
    moment = now()
    midnight = datetime.combine(utc_day(moment) + timedelta(days=1), time(0), UTC)
    if midnight - moment < margin:
        await asyncio.sleep((midnight - moment).total_seconds() + 1)


def calendar_edges(after: date) -> list[datetime]:
    """Noon on the next month's last day, the next year end and the next leap day after
    `after`: the days a run of the date-sensitive tests is moved to (`make test-calendar`),
    always ahead of the real clock, so that events stamped with the real time are never in the
    moved clock's future."""
    next_month_end = month_end(month_start(after) + timedelta(days=32))
    year_end = date(after.year + (after >= date(after.year, 12, 31)), 12, 31)
    year = after.year + (after >= date(after.year, 2, 28))
    while not isleap(year):
        year += 1
    days = sorted({next_month_end, year_end, date(year, 2, 29)})
    return [datetime.combine(day, time(12), UTC) for day in days]


if __name__ == "__main__":
    print(" ".join(iso(moment) for moment in calendar_edges(today())))  # noqa: T201
