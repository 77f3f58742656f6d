"""The usage correction v1 on the usage topic: decoded by `event_type`, with the usage event's
rules for ids, exact decimals and times, and its own for what each action may carry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from llm_usage.domain.corrections import Action, Correction
from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_topic_record

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def correction_json(**overrides: Any) -> bytes:
    data: dict[str, Any] = {
        "event_type": "llm_usage_corrected",
        "correction_id": "c-1",
        "gateway_request_id": "req-1",
        "tenant_id": "acme",
        "action": "amend",
        "fields": {"input_tokens": 1200, "customer_charge_usd": "0.0042"},
        "reason": "billed in the wrong unit",
        "actor": "ops@example.com",
        "occurred_at": "2026-11-14T10:12:03+01:00",
        "event_occurred_at": "2026-11-13T22:01:00Z",
    }
    data.update(overrides)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def decoded(value: bytes) -> Correction:
    answer = decode_usage_topic_record(value, now=NOW)
    assert isinstance(answer, Correction), answer
    return answer


def refused(value: bytes) -> str:
    answer = decode_usage_topic_record(value, now=NOW)
    assert isinstance(answer, Rejection), answer
    assert answer.reason is DeadLetterReason.SCHEMA_VIOLATION
    return answer.detail


def test_an_amend_decodes_with_times_in_utc_and_only_the_fields_sent() -> None:
    correction = decoded(correction_json())
    assert correction.key == ("acme", "c-1")
    assert correction.event == ("acme", "req-1")
    assert correction.action is Action.AMEND
    assert correction.fields == {"input_tokens": 1200, "customer_charge_usd": Decimal("0.0042")}
    assert correction.occurred_at == datetime(2026, 11, 14, 9, 12, 3, tzinfo=UTC)
    assert correction.event_occurred_at == datetime(2026, 11, 13, 22, 1, tzinfo=UTC)
    assert correction.fields_json() == {"input_tokens": 1200, "customer_charge_usd": "0.0042"}


def test_a_charge_sent_as_a_json_number_is_read_from_its_digits() -> None:
    value = correction_json(fields=...).replace(
        b'"reason"', b'"fields": {"customer_charge_usd": 0.100000000000000005}, "reason"'
    )
    assert decoded(value).fields == {"customer_charge_usd": Decimal("0.100000000000000005")}


@pytest.mark.parametrize("fields", [..., None, {}])
def test_a_void_carries_no_fields(fields: object) -> None:
    correction = decoded(correction_json(action="void", fields=fields))
    assert correction.action is Action.VOID
    assert correction.fields == {}


def test_an_attribution_may_be_corrected_to_null() -> None:
    assert decoded(correction_json(fields={"agent_id": None})).fields == {"agent_id": None}


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"action": "void", "fields": {"input_tokens": 1}}, "a void changes no field"),
        ({"fields": {}}, "an amend must send at least one corrected field"),
        ({"fields": ...}, "an amend must send at least one corrected field"),
        ({"fields": {"inptu_tokens": 1}}, "fields.inptu_tokens: is not a field a correction"),
        ({"fields": {"model": "gpt"}}, "fields.model: is not a field a correction can change"),
        ({"fields": {"input_tokens": -1}}, "fields.input_tokens: must be at least 0"),
        ({"fields": {"input_tokens": None}}, "fields.input_tokens: must be a whole number"),
        ({"fields": {"customer_charge_usd": None}}, "must be a decimal >= 0, not null"),
        (
            {"fields": {"customer_charge_usd": "1.50", "customer_charge_cents": 140}},
            "disagrees with customer_charge_usd",
        ),
        ({"action": "delete"}, "action"),
        ({"reason": ""}, "reason"),
        ({"reason": ...}, "reason: is required"),
        ({"actor": ...}, "actor: is required"),
        ({"correction_id": " c-1"}, "correction_id: must not begin or end with whitespace"),
        ({"occurred_at": "2999-01-01T00:00:00Z"}, "occurred_at: is more than 5 minutes after"),
        ({"occurred_at": "2026-11-14T10:12:03"}, "occurred_at"),
        ({"schema_version": 2}, "schema_version: must be 1"),
    ],
)
def test_what_a_correction_may_not_be(overrides: dict[str, Any], says: str) -> None:
    assert says in refused(correction_json(**overrides))


def test_cents_alone_and_cents_agreeing_within_one_cent_are_accepted() -> None:
    assert decoded(correction_json(fields={"customer_charge_cents": 150})).fields == {
        "customer_charge_cents": 150
    }
    both = {"customer_charge_usd": "1.505", "customer_charge_cents": 150}
    assert decoded(correction_json(fields=both)).fields["customer_charge_cents"] == 150


def test_a_duplicate_name_is_refused_as_for_every_event() -> None:
    value = correction_json().replace(b'"actor"', b'"actor": "x", "actor"')
    answer = decode_usage_topic_record(value, now=NOW)
    assert isinstance(answer, Rejection)
