"""Dead-letter reasons and headers, exactly as docs/contract.md ("Dead letters") names them."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from llm_usage.schemas.dead_letter import (
    DLQ_HEADER_NAMES,
    DeadLetterReason,
    Rejection,
    dead_letter_headers,
    format_failed_at,
)

FAILED_AT = datetime(2026, 11, 14, 9, 12, 3, 120999, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reason", "header_value"),
    [
        (DeadLetterReason.INVALID_JSON, "invalid_json"),
        (DeadLetterReason.SCHEMA_VIOLATION, "schema_violation"),
        (DeadLetterReason.CONFLICTING_DUPLICATE, "conflicting_duplicate"),
        (DeadLetterReason.TOO_LARGE, "too_large"),
        (DeadLetterReason.EXPIRED, "expired"),
    ],
)
def test_each_reason_is_written_as_the_contract_spells_it(
    reason: DeadLetterReason, header_value: str
) -> None:
    assert reason == header_value
    headers = dict(
        dead_letter_headers(
            reason=reason, detail="d", topic="t", partition=0, offset=0, failed_at=FAILED_AT
        )
    )
    assert headers["dlq.reason"] == header_value.encode()


def test_there_are_exactly_the_reasons_of_the_contract() -> None:
    assert {reason.value for reason in DeadLetterReason} == {
        "invalid_json",
        "schema_violation",
        "conflicting_duplicate",
        "too_large",
        "expired",
        "unpriced",
        "unknown_event",
    }


def test_headers_carry_reason_detail_origin_and_time_in_order() -> None:
    headers = dead_letter_headers(
        reason=DeadLetterReason.SCHEMA_VIOLATION,
        detail="tenant_id: is required",
        topic="llm_usage_recorded",
        partition=3,
        offset=1234567890123,
        failed_at=FAILED_AT,
    )
    assert headers == [
        ("dlq.reason", b"schema_violation"),
        ("dlq.detail", b"tenant_id: is required"),
        ("dlq.topic", b"llm_usage_recorded"),
        ("dlq.partition", b"3"),
        ("dlq.offset", b"1234567890123"),
        ("dlq.failed_at", b"2026-11-14T09:12:03.120Z"),
    ]
    assert tuple(name for name, _ in headers) == DLQ_HEADER_NAMES


@pytest.mark.parametrize(
    ("failed_at", "expected"),
    [
        (datetime(2026, 11, 14, 9, 12, 3, tzinfo=UTC), "2026-11-14T09:12:03.000Z"),
        (datetime(2026, 11, 14, 9, 12, 3, 999999, tzinfo=UTC), "2026-11-14T09:12:03.999Z"),
        (
            datetime(
                2026, 11, 14, 14, 42, 3, 5000, tzinfo=timezone(timedelta(hours=5, minutes=30))
            ),
            "2026-11-14T09:12:03.005Z",
        ),
        (
            datetime(2026, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-8))),
            "2027-01-01T07:00:00.000Z",
        ),
    ],
)
def test_failed_at_is_rfc3339_utc_with_milliseconds_and_z(
    failed_at: datetime, expected: str
) -> None:
    assert format_failed_at(failed_at) == expected


def test_a_naive_failed_at_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_failed_at(datetime(2026, 11, 14, 9, 12, 3))  # noqa: DTZ001 - the point of the test


def test_detail_is_utf8_and_a_lone_surrogate_never_stops_publishing() -> None:
    headers = dict(
        dead_letter_headers(
            reason=DeadLetterReason.INVALID_JSON,
            detail="tenant_id: «münchen» \ud800",
            topic="t",
            partition=0,
            offset=0,
            failed_at=FAILED_AT,
        )
    )
    assert headers["dlq.detail"] == "tenant_id: «münchen» \\ud800".encode()


def test_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="not_a_reason"):
        dead_letter_headers(
            reason="not_a_reason",  # type: ignore[arg-type]
            detail="d",
            topic="t",
            partition=0,
            offset=0,
            failed_at=FAILED_AT,
        )


def test_a_rejection_cannot_be_changed_after_the_fact() -> None:
    rejection = Rejection(DeadLetterReason.TOO_LARGE, "70000 bytes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rejection.detail = "other"  # type: ignore[misc]
