"""The period charge v1 on the usage topic: decoded by `event_type`, with the usage event's rules
for ids, exact decimals and times."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from llm_usage.domain.period_charges import PeriodCharge, differing_fields
from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_event, decode_usage_topic_record
from llm_usage.schemas.usage_event import UsageRow

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def charge_json(**overrides: Any) -> bytes:
    data: dict[str, Any] = {
        "event_type": "llm_period_charge_recorded",
        "period_charge_id": "pc-1",
        "tenant_id": "acme",
        "deployment_id": "dep-1",
        "period": "2026-10",
        "period_charge_usd": "49.995",
        "occurred_at": "2026-11-01T00:05:00+01:00",
    }
    data.update(overrides)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def decoded(value: bytes) -> PeriodCharge:
    answer = decode_usage_topic_record(value, now=NOW)
    assert isinstance(answer, PeriodCharge), answer
    return answer


def refused(value: bytes) -> str:
    answer = decode_usage_topic_record(value, now=NOW)
    assert isinstance(answer, Rejection), answer
    assert answer.reason is DeadLetterReason.SCHEMA_VIOLATION
    return answer.detail


def test_a_period_charge_decodes_with_its_time_in_utc_and_its_charge_exact() -> None:
    charge = decoded(charge_json())
    assert charge.period_charge_id == "pc-1"
    assert charge.tenant_id == "acme"
    assert charge.deployment_id == "dep-1"
    assert charge.period == "2026-10"
    assert charge.period_charge_usd == Decimal("49.995")
    assert charge.occurred_at == datetime(2026, 10, 31, 23, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("spelling", "exact"),
    [
        (b"49.995", Decimal("49.995")),  # a JSON number, read from its digits
        (b"1.5E-7", Decimal("1.5E-7")),
        (b'"0.100000000000000001"', Decimal("0.100000000000000001")),
        (b"0", Decimal(0)),
    ],
)
def test_the_period_charge_is_read_exactly_from_its_literal_digits(
    spelling: bytes, exact: Decimal
) -> None:
    raw = charge_json(period_charge_usd="CHARGE").replace(b'"CHARGE"', spelling)
    assert decoded(raw).period_charge_usd == exact


def test_a_null_deployment_is_its_own_group() -> None:
    assert decoded(charge_json(deployment_id=None)).deployment_id is None
    assert decoded(charge_json(deployment_id=...)).deployment_id is None


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"period_charge_id": ...}, "period_charge_id: is required"),
        ({"period_charge_id": " pc"}, "period_charge_id: must not begin or end with whitespace"),
        ({"tenant_id": "a\u0007b"}, "tenant_id: must not contain control characters"),
        ({"period_charge_id": "x" * 201}, "period_charge_id: at most 200 characters"),
        ({"period": "2026-13"}, "period: String should match pattern"),
        ({"period": "2026-1"}, "period: String should match pattern"),
        ({"period_charge_usd": ...}, "period_charge_usd: is required"),
        ({"period_charge_usd": "-1"}, "period_charge_usd: must be at least 0"),
        ({"period_charge_usd": 1.5e300}, "period_charge_usd: at most 12 digits before"),
        ({"period_charge_usd": "1e"}, "period_charge_usd: must be a number written in digits"),
        ({"occurred_at": "2026-11-01T00:05:00"}, "occurred_at: must be an RFC 3339 date-time"),
        ({"occurred_at": "2026-11-23T12:06:00Z"}, "occurred_at: is more than 5 minutes after"),
        ({"schema_version": 2}, "schema_version: must be 1"),
    ],
)
def test_a_broken_rule_is_a_schema_violation_naming_the_field(
    overrides: dict[str, Any], detail: str
) -> None:
    assert refused(charge_json(**overrides)).startswith(detail)


def test_without_its_event_type_a_record_is_read_as_a_usage_event() -> None:
    detail = refused(charge_json(event_type=...))
    assert "gateway_request_id: is required" in detail


def test_usage_events_still_decode_to_rows_and_other_event_types_stay_refused() -> None:
    usage = (
        b'{"gateway_request_id": "r", "tenant_id": "t", "customer_charge_usd": "1", '
        b'"occurred_at": "2026-11-14T09:00:00Z"}'
    )
    assert isinstance(decode_usage_topic_record(usage, now=NOW), UsageRow)
    other = usage.replace(b'{"', b'{"event_type": "llm_budget_alert", "', 1)
    assert refused(other) == "event_type: must be 'llm_usage_recorded'"


def test_the_usage_event_decoder_alone_still_refuses_a_period_charge() -> None:
    # The HTTP ingest publishes usage events only; it keeps refusing anything else.
    answer = decode_usage_event(charge_json(), now=NOW)
    assert isinstance(answer, Rejection)


def test_a_copy_differs_only_in_facts_not_in_spelling() -> None:
    first = decoded(charge_json())
    same = decoded(charge_json(period_charge_usd="49.9950", occurred_at="2026-10-31T23:05:00Z"))
    other = decoded(charge_json(period_charge_usd="50", deployment_id=None))
    assert differing_fields(first, same) == []
    assert differing_fields(first, other) == ["deployment_id", "period_charge_usd"]
