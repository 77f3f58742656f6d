"""Which parts of a report's range [start, end) come from the daily aggregate and which from
raw events, exactly.

Whole UTC days inside the range are read from the aggregate. A day the range cuts is read
either as the raw events of its part inside the range, or as the day's aggregate minus the raw
events of its part outside the range: whichever reads fewer events. A stretch is measured by
its length before `now`, since after now there are only the few events of skewed clocks: so a
range ending now reads the (nearly empty) rest of today, not today's events, at any hour. Pure
functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from llm_usage.domain.periods import utc_day

_DAY = timedelta(days=1)


@dataclass(frozen=True)
class RawPiece:
    """Raw events with start <= occurred_at < end, added (sign 1) or taken away (sign -1)."""

    start: datetime
    end: datetime
    sign: int


@dataclass(frozen=True)
class ReadPlan:
    """The aggregate's days [first_day, end_day) plus the raw pieces (at most two)."""

    first_day: date
    end_day: date
    raw: tuple[RawPiece, ...]


def midnight(day: date) -> datetime:
    """The first instant of the UTC day `day`."""
    return datetime.combine(day, time(0), UTC)


def _cost(pieces: tuple[RawPiece, ...], now: datetime) -> timedelta:
    """How long the pieces reach before `now`: what reading their events costs."""
    return sum(
        (max(min(piece.end, now) - piece.start, timedelta()) for piece in pieces), timedelta()
    )


def cut_day(
    day: date, start: datetime, end: datetime, *, now: datetime
) -> tuple[bool, tuple[RawPiece, ...]]:
    """How to read the part [start, end) of the UTC day `day` (start < end, both within it):
    (whether the day's aggregate is read, the raw pieces). The cheaper raw stretch wins."""
    day_start, day_end = midnight(day), midnight(day + _DAY)
    inside = (RawPiece(start, end, 1),)
    outside = tuple(
        piece
        for piece in (RawPiece(day_start, start, -1), RawPiece(end, day_end, -1))
        if piece.start < piece.end
    )
    if _cost(inside, now) <= _cost(outside, now):
        return False, inside
    return True, outside


def read_plan(start: datetime, end: datetime, *, now: datetime) -> ReadPlan:
    """How to read [start, end) exactly from the daily aggregate and raw events, `now` being
    the current instant (the events after it are few)."""
    start, end, now = start.astimezone(UTC), end.astimezone(UTC), now.astimezone(UTC)
    if end <= start:
        return ReadPlan(utc_day(start), utc_day(start), ())
    first_day, last_day = utc_day(start), utc_day(end - timedelta.resolution)
    if first_day == last_day:
        if start == midnight(first_day) and end == midnight(first_day + _DAY):
            return ReadPlan(first_day, first_day + _DAY, ())
        aggregate, raw = cut_day(first_day, start, end, now=now)
        end_day = first_day + _DAY if aggregate else first_day
        return ReadPlan(first_day, end_day, raw)
    # Whole days between the edges; each cut edge joins them when its aggregate is read, so
    # the aggregate's days stay one contiguous range.
    aggregate_first, aggregate_end = first_day, last_day + _DAY
    pieces: list[RawPiece] = []
    if start != midnight(first_day):
        aggregate, raw = cut_day(first_day, start, midnight(first_day + _DAY), now=now)
        pieces += raw
        if not aggregate:
            aggregate_first = first_day + _DAY
    if end != midnight(last_day + _DAY):
        aggregate, raw = cut_day(last_day, midnight(last_day), end, now=now)
        pieces += raw
        if not aggregate:
            aggregate_end = last_day
    return ReadPlan(aggregate_first, aggregate_end, tuple(pieces))
