"""Times and ranges as the API's query parameters read them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.exceptions import RequestValidationError

from llm_usage.api.params import parse_instant, rfc3339, time_range

NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T09:00:00Z", datetime(2026, 11, 1, 9, tzinfo=UTC)),
        ("2026-11-01t09:00:00z", datetime(2026, 11, 1, 9, tzinfo=UTC)),
        ("2026-11-01T10:00:00+01:00", datetime(2026, 11, 1, 9, tzinfo=UTC)),
        ("2026-11-01T09:00:00.1234567Z", datetime(2026, 11, 1, 9, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_instants_are_rfc3339_with_an_offset_or_dates(text: str, expected: datetime) -> None:
    assert parse_instant(text) == expected


@pytest.mark.parametrize(
    "text",
    ["2026-11-01T09:00:00", "2026-13-01", "yesterday", "1730000000", "2026-11-01T25:00:00Z", ""],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|month|hour|day"):
        parse_instant(text)


def test_the_default_range_is_this_utc_month_up_to_now() -> None:
    assert time_range(None, None, now=NOW) == (datetime(2026, 11, 1, tzinfo=UTC), NOW)


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("2026-11-02", "2026-11-01", "to"),
        (None, "2026-10-01", "to"),
        ("2025-01-01", "2026-11-01", "from"),
        (None, "2028-01-01", "to"),
        ("someday", None, "from"),
        # Past the last day's midnight: the day after it cannot be written.
        ("9999-12-30", "9999-12-31T00:00:01Z", "to"),
        ("9999-12-31T06:00:00Z", "9999-12-31T07:00:00Z", "from"),
    ],
)
def test_a_bad_range_names_the_parameter(start: str | None, end: str | None, field: str) -> None:
    with pytest.raises(RequestValidationError) as raised:
        time_range(start, end, now=NOW)
    assert [error["loc"] for error in raised.value.errors()] == [("query", field)]


def test_times_are_written_in_utc_with_z() -> None:
    assert rfc3339(parse_instant("2026-11-01T10:00:00+01:00")) == "2026-11-01T09:00:00Z"
    assert rfc3339(datetime(2026, 11, 1, 0, 0, 0, 5, tzinfo=UTC)) == "2026-11-01T00:00:00.000005Z"
