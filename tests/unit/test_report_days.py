"""Which days of a report's range come from the aggregate, and which raw pieces make it exact."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.domain.periods import utc_day
from llm_usage.domain.report_days import RawPiece, ReadPlan, midnight, read_plan
from tests import clock

DAY = timedelta(days=1)
# A fixed UTC midnight of last year: the plan is calendar arithmetic, any day will do.
BASE = midnight(clock.today().replace(month=3, day=1) - timedelta(days=365))


def _weight(plan: ReadPlan, moment: datetime) -> int:
    """How many times the plan counts an event at `moment` (the aggregate counts every event of
    its days; each raw piece adds or takes away its own)."""
    in_aggregate = plan.first_day <= utc_day(moment) < plan.end_day
    return int(in_aggregate) + sum(
        piece.sign for piece in plan.raw if piece.start <= moment < piece.end
    )


def _raw_span(plan: ReadPlan) -> timedelta:
    return sum((piece.end - piece.start for piece in plan.raw), timedelta())


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
@given(edges, edges, st.lists(instants, max_size=30))
def test_every_instant_is_counted_once_inside_the_range_and_never_outside(
    a: datetime, b: datetime, probes: list[datetime]
) -> None:
    start, end = min(a, b), max(a, b)
    plan = read_plan(start, end)
    assert len(plan.raw) <= 2
    assert plan.first_day <= plan.end_day
    interesting = [start, end, start - timedelta.resolution, end - timedelta.resolution]
    for day in range(6):
        interesting += [BASE + day * DAY, BASE + day * DAY - timedelta.resolution]
    for moment in [*probes, *interesting]:
        assert _weight(plan, moment) == int(start <= moment < end), (start, end, moment, plan)


@settings(max_examples=200)
@given(edges, edges)
def test_a_cut_day_reads_the_shorter_raw_stretch(a: datetime, b: datetime) -> None:
    start, end = min(a, b), max(a, b)
    plan = read_plan(start, end)
    for piece in plan.raw:
        day = utc_day(piece.start)
        assert utc_day(piece.end - timedelta.resolution) == day  # a piece stays in its day
    # Each cut day's raw stretch is at most half a day unless both edges cut the same day, where
    # the inside and the outside together are one day.
    if utc_day(start) == utc_day(end - timedelta.resolution) or end <= start:
        assert _raw_span(plan) <= DAY / 2
    else:
        assert all(piece.end - piece.start <= DAY / 2 for piece in plan.raw)


def test_a_range_up_to_now_reads_only_the_rest_of_today() -> None:
    now = BASE + 3 * DAY + timedelta(hours=17, minutes=5)
    plan = read_plan(BASE, now)
    assert (plan.first_day, plan.end_day) == (BASE.date(), (BASE + 4 * DAY).date())
    assert plan.raw == (RawPiece(now, BASE + 4 * DAY, -1),)


def test_a_range_from_shortly_before_midnight_reads_those_events() -> None:
    start = BASE + DAY - timedelta(minutes=10)
    plan = read_plan(start, BASE + 3 * DAY)
    assert (plan.first_day, plan.end_day) == ((BASE + DAY).date(), (BASE + 3 * DAY).date())
    assert plan.raw == (RawPiece(start, BASE + DAY, 1),)


def test_whole_days_read_no_raw_events_in_any_offset() -> None:
    plus_two = timezone(timedelta(hours=2))
    start = (BASE + DAY).astimezone(plus_two)  # 02:00 at +02:00 is a UTC midnight
    plan = read_plan(start, BASE + 3 * DAY)
    assert plan == ReadPlan((BASE + DAY).date(), (BASE + 3 * DAY).date(), ())
    one_day = read_plan(BASE, BASE + DAY)
    assert one_day == ReadPlan(BASE.date(), (BASE + DAY).date(), ())


def test_a_short_stretch_inside_one_day_is_read_raw_and_a_long_one_from_the_aggregate() -> None:
    noon = BASE + timedelta(hours=12)
    short = read_plan(noon, noon + timedelta(hours=1))
    assert short == ReadPlan(
        BASE.date(), BASE.date(), (RawPiece(noon, noon + timedelta(hours=1), 1),)
    )
    long = read_plan(BASE + timedelta(hours=1), BASE + timedelta(hours=23))
    assert long == ReadPlan(
        BASE.date(),
        (BASE + DAY).date(),
        (
            RawPiece(BASE, BASE + timedelta(hours=1), -1),
            RawPiece(BASE + timedelta(hours=23), BASE + DAY, -1),
        ),
    )
    empty = read_plan(noon, noon)
    assert empty.raw == ()
    assert empty.first_day == empty.end_day
