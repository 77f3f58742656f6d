"""Which months exist, are created ahead, or are past retention; the identity's decision table."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from llm_usage.domain.identity import Identity, identity_of, is_expired
from llm_usage.domain.periods import add_months
from llm_usage.domain.retention import (
    months_ahead,
    months_past_retention,
    months_to_create,
    oldest_kept_month,
    partition_name,
)


@pytest.mark.parametrize(
    ("day", "months", "expected"),
    [
        (date(2026, 12, 1), 1, date(2027, 1, 1)),
        (date(2026, 1, 1), -1, date(2025, 12, 1)),
        (date(2028, 2, 1), -25, date(2026, 1, 1)),
        (date(2027, 11, 1), 14, date(2029, 1, 1)),
    ],
)
def test_add_months_crosses_years(day: date, months: int, expected: date) -> None:
    assert add_months(day, months) == expected


def test_a_new_database_gets_every_kept_month_and_two_ahead() -> None:
    months = months_to_create(date(2028, 2, 29), 25, known=set())
    assert months[0] == oldest_kept_month(date(2028, 2, 29), 25) == date(2026, 1, 1)
    assert months[-1] == date(2028, 4, 1)
    assert len(months) == 25 + 1 + 2


def test_known_and_dropped_months_are_never_created_again() -> None:
    known = {date(2026, 12, 1), date(2027, 1, 1)}
    assert months_to_create(date(2026, 12, 31), 0, known=known) == [date(2027, 2, 1)]


def test_months_a_legacy_partition_covers_are_not_created() -> None:
    months = months_to_create(date(2026, 12, 6), 25, known=set(), covered_until=date(2027, 2, 1))
    assert months == [date(2027, 2, 1)]


def test_months_past_retention_are_the_attached_ones_before_the_oldest_kept() -> None:
    attached = [date(2024, 10, 1), date(2024, 11, 1), date(2024, 12, 1), date(2026, 12, 1)]
    assert months_past_retention(date(2026, 12, 31), 25, attached) == [date(2024, 10, 1)]


def test_months_ahead_counts_whole_months_past_the_current_one() -> None:
    assert months_ahead(date(2026, 12, 31), date(2027, 2, 1)) == 2
    assert months_ahead(date(2027, 1, 1), date(2027, 2, 1)) == 1
    assert months_ahead(date(2027, 1, 1), None) == -1


def test_partition_names_sort_like_their_months() -> None:
    assert partition_name(date(2027, 1, 1)) == "llm_usage_events_2027_01"
    names = [partition_name(date(2026, m, 1)) for m in (1, 10, 12)]
    assert names == sorted(names)


def test_expired_is_before_the_floor_in_utc() -> None:
    floor = date(2024, 11, 1)
    assert is_expired(datetime(2024, 10, 31, 23, 59, 59, tzinfo=UTC), floor)
    assert not is_expired(datetime(2024, 11, 1, tzinfo=UTC), floor)
    assert not is_expired(datetime(2000, 1, 1, tzinfo=UTC), None)
    assert not is_expired(datetime(2000, 1, 1, tzinfo=UTC), date.min)  # the legacy partition


@pytest.mark.parametrize(
    ("window", "stored", "expected"),
    [
        (None, None, Identity.FIRST_COPY),
        (True, None, Identity.FIRST_SEEN_ELSEWHERE),
        (True, True, Identity.DUPLICATE),
        (None, True, Identity.DUPLICATE),
        (False, True, Identity.DUPLICATE),  # an old event re-sent after its id was re-used
        (False, None, Identity.CONFLICT),
        (None, False, Identity.CONFLICT),
        (True, False, Identity.CONFLICT),
    ],
)
def test_identity_decision_table(
    window: bool | None, stored: bool | None, expected: Identity
) -> None:
    assert identity_of(window_equal=window, stored_equal=stored) is expected
