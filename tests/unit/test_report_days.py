"""Which days of a report's range come from the aggregate, and which raw pieces make it exact."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.domain.periods import utc_day
from llm_usage.domain.report_days import RawPiece, ReadPlan, midnight, read_plan
from tests import clock

DAY = timedelta(days=1)
# A fixed UTC midnight of last year: the plan is calendar arithmetic, any day will do.
BASE = midnight(clock.today().replace(month=3, day=1) - timedelta(days=365))
# After every range below: all of their days are past.
LATER = BASE + 30 * DAY


def _weight(plan: ReadPlan, moment: datetime) -> int:
    """How many times the plan counts an event at `moment` (the aggregate counts every event of
    its days; each raw piece adds or takes away its own)."""
    in_aggregate = plan.first_day <= utc_day(moment) < plan.end_day
    return int(in_aggregate) + sum(
        piece.sign for piece in plan.raw if piece.start <= moment < piece.end
    )


def _cost(pieces: tuple[RawPiece, ...], now: datetime) -> timedelta:
    """How long the pieces reach before `now`."""
    return sum(
        (max(min(piece.end, now) - piece.start, timedelta()) for piece in pieces), timedelta()
    )


instants = st.integers(min_value=0, max_value=4 * 86400 * 1_000_000).map(
    lambda us: BASE + timedelta(microseconds=us)
)
# Whole seconds, minutes and midnights too: the edges where a form changes.
edges = st.one_of(
    instants,
    st.integers(0, 4 * 86400).map(lambda s: BASE + timedelta(seconds=s)),
    st.integers(0, 4).map(lambda d: BASE + d * DAY),
)


@settings(max_examples=400)
@given(edges, edges, edges, st.lists(instants, max_size=30))
def test_every_instant_is_counted_once_inside_the_range_and_never_outside(
    a: datetime, b: datetime, now: datetime, probes: list[datetime]
) -> None:
    start, end = min(a, b), max(a, b)
    plan = read_plan(start, end, now=now)
    assert len(plan.raw) <= 2
    assert plan.first_day <= plan.end_day
    interesting = [start, end, start - timedelta.resolution, end - timedelta.resolution]
    for day in range(6):
        interesting += [BASE + day * DAY, BASE + day * DAY - timedelta.resolution]
    for moment in [*probes, *interesting]:
        assert _weight(plan, moment) == int(start <= moment < end), (start, end, moment, plan)


@settings(max_examples=300)
@given(edges, edges, edges)
def test_a_cut_day_reads_the_stretch_with_less_time_before_now(
    a: datetime, b: datetime, now: datetime
) -> None:
    start, end = min(a, b), max(a, b)
    plan = read_plan(start, end, now=now)
    for piece in plan.raw:
        day = utc_day(piece.start)
        assert utc_day(piece.end - timedelta.resolution) == day  # a piece stays in its day
    if end <= start:
        assert plan.raw == ()
        return
    # Per cut day, the other way of reading it would not have read less before `now`.
    for day in {utc_day(start), utc_day(end - timedelta.resolution)}:
        day_start, day_end = midnight(day), midnight(day) + DAY
        inside_start, inside_end = max(start, day_start), min(end, day_end)
        if (inside_start, inside_end) == (day_start, day_end):
            continue  # a whole day: the aggregate alone
        chosen = tuple(p for p in plan.raw if utc_day(p.start) == day)
        inside = (RawPiece(inside_start, inside_end, 1),)
        outside = (RawPiece(day_start, inside_start, -1), RawPiece(inside_end, day_end, -1))
        other = outside if chosen == inside else inside
        assert _cost(chosen, now) <= _cost(other, now), (start, end, now, plan)


@pytest.mark.parametrize("hour", [1, 12, 17, 23])
def test_a_range_up_to_now_reads_only_the_rest_of_today_at_any_hour(hour: int) -> None:
    now = BASE + 3 * DAY + timedelta(hours=hour, minutes=5)
    plan = read_plan(BASE, now, now=now)
    assert (plan.first_day, plan.end_day) == (BASE.date(), (BASE + 4 * DAY).date())
    assert plan.raw == (RawPiece(now, BASE + 4 * DAY, -1),)
    # Today so far, as the summary's `today` and the page's tile read it.
    today = read_plan(BASE + 3 * DAY, now, now=now)
    assert today == ReadPlan((BASE + 3 * DAY).date(), (BASE + 4 * DAY).date(), plan.raw)


def test_a_range_from_a_cut_past_day_reads_its_shorter_part() -> None:
    now = BASE + 3 * DAY + timedelta(hours=1)
    morning = BASE + timedelta(hours=6)
    from_morning = read_plan(morning, now, now=now)
    assert from_morning == ReadPlan(
        BASE.date(),
        (BASE + 4 * DAY).date(),
        (RawPiece(BASE, morning, -1), RawPiece(now, BASE + 4 * DAY, -1)),
    )
    evening = BASE + timedelta(hours=18)
    from_evening = read_plan(evening, now, now=now)
    assert from_evening == ReadPlan(
        (BASE + DAY).date(),
        (BASE + 4 * DAY).date(),
        (RawPiece(evening, BASE + DAY, 1), RawPiece(now, BASE + 4 * DAY, -1)),
    )


def test_a_range_from_shortly_before_midnight_reads_those_events() -> None:
    start = BASE + DAY - timedelta(minutes=10)
    plan = read_plan(start, BASE + 3 * DAY, now=LATER)
    assert (plan.first_day, plan.end_day) == ((BASE + DAY).date(), (BASE + 3 * DAY).date())
    assert plan.raw == (RawPiece(start, BASE + DAY, 1),)


def test_whole_days_read_no_raw_events_in_any_offset() -> None:
    plus_two = timezone(timedelta(hours=2))
    start = (BASE + DAY).astimezone(plus_two)  # 02:00 at +02:00 is a UTC midnight
    plan = read_plan(start, BASE + 3 * DAY, now=LATER)
    assert plan == ReadPlan((BASE + DAY).date(), (BASE + 3 * DAY).date(), ())
    one_day = read_plan(BASE, BASE + DAY, now=LATER)
    assert one_day == ReadPlan(BASE.date(), (BASE + DAY).date(), ())


def test_a_short_stretch_inside_a_past_day_is_read_raw_and_a_long_one_from_the_aggregate() -> None:
    noon = BASE + timedelta(hours=12)
    short = read_plan(noon, noon + timedelta(hours=1), now=LATER)
    assert short == ReadPlan(
        BASE.date(), BASE.date(), (RawPiece(noon, noon + timedelta(hours=1), 1),)
    )
    long = read_plan(BASE + timedelta(hours=1), BASE + timedelta(hours=23), now=LATER)
    assert long == ReadPlan(
        BASE.date(),
        (BASE + DAY).date(),
        (
            RawPiece(BASE, BASE + timedelta(hours=1), -1),
            RawPiece(BASE + timedelta(hours=23), BASE + DAY, -1),
        ),
    )
    empty = read_plan(noon, noon, now=LATER)
    assert empty.raw == ()
    assert empty.first_day == empty.end_day
