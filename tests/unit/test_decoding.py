"""From record bytes to an event or a dead-letter reason, without ever raising on bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import MAX_DETAIL_CHARS, MAX_EVENT_BYTES, decode_usage_event
from llm_usage.schemas.usage_event import UnpricedEvent, UsageRow

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
BASE_EVENT = (
    '{"gateway_request_id": "req-1", "tenant_id": "acme", "input_tokens": 1200, '
    '"output_tokens": 300, "customer_charge_usd": %s, "occurred_at": "2026-11-14T09:00:00Z"}'
)


def event_json(**overrides: Any) -> bytes:
    data: dict[str, Any] = {
        "gateway_request_id": "req-1",
        "tenant_id": "acme",
        "input_tokens": 1200,
        "output_tokens": 300,
        "customer_charge_usd": "0.0054",
        "occurred_at": "2026-11-14T09:00:00Z",
    }
    data.update(overrides)
    return json.dumps(data).encode()


def decoded_event(value: bytes) -> UsageRow:
    decoded = decode_usage_event(value, now=NOW)
    assert isinstance(decoded, UsageRow), decoded
    return decoded


def rejection(value: bytes | None) -> Rejection:
    decoded = decode_usage_event(value, now=NOW)
    assert isinstance(decoded, Rejection), decoded
    return decoded


def padded_to(size: int) -> bytes:
    """A valid event of exactly `size` bytes, grown by an unknown field."""
    bare = len(event_json(padding=""))
    value = event_json(padding="x" * (size - bare))
    assert len(value) == size
    return value


def test_a_valid_event_decodes() -> None:
    event = decoded_event(event_json())
    assert (event.gateway_request_id, event.customer_charge_usd) == ("req-1", Decimal("0.0054"))


@pytest.mark.parametrize(
    ("literal", "exact"),
    [
        ("12345678901.234567891", "12345678901.234567891"),
        ("0.1", "0.1"),
        ("0.30000000000000004", "0.30000000000000004"),
        ("0.123456789012345678", "0.123456789012345678"),
        ("999999999999.999999999999999999", "999999999999.999999999999999999"),
        ("0.50", "0.50"),
        ("5", "5"),
        ("1e-7", "1E-7"),
        ('"12345678901.234567891"', "12345678901.234567891"),
    ],
)
def test_json_numbers_are_read_exactly_from_their_literal_digits(literal: str, exact: str) -> None:
    event = decoded_event((BASE_EVENT % literal).encode())
    assert str(event.customer_charge_usd) == exact


def test_a_20_significant_digit_charge_comes_back_exactly() -> None:
    event = decoded_event((BASE_EVENT % "12345678901.234567891").encode())
    assert event.customer_charge_usd == Decimal("12345678901.234567891")
    assert event.customer_charge_usd.as_tuple().digits == tuple(
        int(digit) for digit in "12345678901234567891"
    )


def test_unknown_fields_are_ignored() -> None:
    event = decoded_event(event_json(trace_id="t", gateway_region="eu", extra={"a": [1.5, None]}))
    assert "trace_id" not in event._asdict()


def test_an_event_of_exactly_64_kib_is_accepted() -> None:
    assert isinstance(decode_usage_event(padded_to(MAX_EVENT_BYTES), now=NOW), UsageRow)


def test_an_event_over_64_kib_is_too_large() -> None:
    refused = rejection(padded_to(MAX_EVENT_BYTES + 1))
    assert refused.reason is DeadLetterReason.TOO_LARGE
    assert refused.detail == "the value is 65537 bytes; at most 65536 are accepted"


def test_a_tombstone_is_invalid_json_with_a_clear_detail() -> None:
    refused = rejection(None)
    assert refused.reason is DeadLetterReason.INVALID_JSON
    assert "tombstone" in refused.detail


@pytest.mark.parametrize(
    ("value", "detail_starts"),
    [
        (b"", "not JSON: Expecting value"),
        (b"{", "not JSON: Expecting property name"),
        (b"{'tenant_id': 'a'}", "not JSON: Expecting property name"),
        (b'{"a": 1} {"b": 2}', "not JSON: Extra data"),
        (b'{"customer_charge_usd": NaN}', "not JSON: NaN is not a JSON number"),
        (b'{"customer_charge_usd": Infinity}', "not JSON: Infinity is not a JSON number"),
        (b'{"customer_charge_usd": -Infinity}', "not JSON: -Infinity is not a JSON number"),
        (b'{"tenant_id": "a\x01"}', "not JSON: Invalid control character"),
        (b"\xff\xfe{}", "not UTF-8: invalid start byte at byte 0"),
        (b'{"tenant_id": "\xed\xa0\x80"}', "not UTF-8: invalid continuation byte"),
        ('{"tenant_id": "acme"}'.encode("utf-16"), "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not JSON: Expecting value"),
        (b"[" * 60000, "not JSON: nested too deeply"),
        (b'{"input_tokens": 1' + b"0" * 5000 + b"}", "not JSON: Exceeds the limit"),
    ],
    ids=[
        "empty",
        "truncated",
        "single quotes",
        "two documents",
        "NaN",
        "Infinity",
        "-Infinity",
        "raw control character",
        "latin-1 bytes",
        "encoded surrogate",
        "UTF-16",
        "byte order mark",
        "deeply nested",
        "5000-digit integer",
    ],
)
def test_what_is_not_utf8_json_is_invalid_json(value: bytes, detail_starts: str) -> None:
    refused = rejection(value)
    assert refused.reason is DeadLetterReason.INVALID_JSON
    assert refused.detail.startswith(detail_starts)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"[]", "an array"),
        (b'[{"tenant_id": "a"}]', "an array"),
        (b'"llm_usage_recorded"', "a string"),
        (b"42", "a number"),
        (b"4.2", "a number"),
        (b"true", "a boolean"),
        (b"null", "null"),
    ],
)
def test_json_that_is_not_an_object_is_a_schema_violation(value: bytes, kind: str) -> None:
    refused = rejection(value)
    assert refused.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert refused.detail == f"the JSON value is {kind}; a usage event is a JSON object"


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (
            event_json(customer_charge_usd="0.0000000000000000001"),
            "customer_charge_usd: at most 18 digits after the decimal point",
        ),
        (
            (BASE_EVENT % "0.12345678901234567890").encode(),
            "customer_charge_usd: at most 18 digits after the decimal point",
        ),
        (
            event_json(upstream_cost_usd="1234567890123"),
            "upstream_cost_usd: at most 12 digits before the decimal point",
        ),
        (event_json(customer_charge_usd="-1"), "customer_charge_usd: must be at least 0"),
        (
            event_json(customer_charge_usd="NaN"),
            'customer_charge_usd: must be a number written in digits, like "0.0054"',
        ),
        (
            event_json(customer_charge_usd=True),
            'customer_charge_usd: must be a decimal string like "0.0054" or a JSON number, '
            "not a boolean",
        ),
        (event_json(tenant_id="t" * 201), "tenant_id: at most 200 characters"),
        (event_json(tenant_id=""), "tenant_id: must have at least 1 character"),
        (event_json(tenant_id=7), "tenant_id: must be a string"),
        (
            event_json(gateway_request_id="  "),
            "gateway_request_id: must not begin or end with whitespace (the contract's id rule)",
        ),
        (
            event_json(tenant_id="acme\u00a0"),
            "tenant_id: must not begin or end with whitespace (the contract's id rule)",
        ),
        (
            event_json(tenant_id="ac\x1bme"),
            "tenant_id: must not contain control characters (U+0000-U+001F, U+007F-U+009F)",
        ),
        (
            event_json(gateway_request_id="r\x85x"),
            "gateway_request_id: must not contain control characters (U+0000-U+001F, "
            "U+007F-U+009F)",
        ),
        (
            b'{"gateway_request_id": "r", "tenant_id": "a", "customer_charge_usd": "1", '
            b'"tenant_id": "b", "occurred_at": "2026-11-14T09:00:00Z"}',
            "tenant_id: is named twice in one object; a field may appear only once",
        ),
        (
            b'{"gateway_request_id": "r", "tenant_id": "a", "customer_charge_usd": "1", '
            b'"meta": {"k": 1, "k": 2}, "occurred_at": "2026-11-14T09:00:00Z"}',
            "k: is named twice in one object; a field may appear only once",
        ),
        (
            event_json(tenant_id="a\x00"),
            "tenant_id: must not contain the NUL character (\\u0000)",
        ),
        (
            event_json(tenant_id="a\ud800"),
            "tenant_id: must be valid Unicode text (no lone surrogate such as \\ud800)",
        ),
        (event_json(gateway_request_id=None), "gateway_request_id: must be a string"),
        (
            json.dumps({"tenant_id": "a", "customer_charge_usd": "1", "occurred_at": "x"}).encode(),
            "gateway_request_id: is required; occurred_at: must be an RFC 3339 date-time with an "
            "offset, like 2026-11-14T09:00:00Z or 2026-11-14T14:30:00+05:30",
        ),
        (
            event_json(input_tokens=True),
            "input_tokens: must be a whole number (not a boolean, a fraction or a string)",
        ),
        (
            b'{"gateway_request_id": "r", "tenant_id": "t", "output_tokens": 5.0, '
            b'"customer_charge_usd": "1", "occurred_at": "2026-11-14T09:00:00Z"}',
            "output_tokens: must be a whole number (not a boolean, a fraction or a string)",
        ),
        (event_json(input_tokens=-1), "input_tokens: must be at least 0"),
        (event_json(total_tokens=2**63), "total_tokens: must be at most 9223372036854775807"),
        (
            event_json(markup_mode="k" * 201),
            "markup_mode: at most 200 characters",
        ),
        (event_json(event_type="llm_budget_alert"), "event_type: must be 'llm_usage_recorded'"),
        (
            event_json(schema_version=2),
            "schema_version: must be 1, the only version this pipeline reads",
        ),
        (
            event_json(occurred_at="2026-11-14T09:00:00"),
            "occurred_at: must be an RFC 3339 date-time with an offset, "
            "like 2026-11-14T09:00:00Z or 2026-11-14T14:30:00+05:30",
        ),
        (
            event_json(occurred_at="2026-11-23T12:05:01Z"),
            "occurred_at: is more than 5 minutes after now (2026-11-23T12:00:00+00:00)",
        ),
        (
            event_json(customer_charge_usd="0.50", customer_charge_cents=52),
            "customer_charge_cents (52) disagrees with customer_charge_usd (0.50, "
            "50 cents rounded half up) by more than 1 cent",
        ),
        (
            event_json(customer_charge_usd=None),
            'customer_charge_usd: must be a decimal string like "0.0054" or a JSON number, '
            "not null",
        ),
    ],
)
def test_a_broken_rule_is_a_schema_violation_naming_the_field_and_why(
    value: bytes, detail: str
) -> None:
    refused = rejection(value)
    assert refused.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert refused.detail == detail


@pytest.mark.parametrize("spaced", [False, True], ids=["fast path", "reference"])
def test_without_a_charge_the_event_is_left_to_the_price_table(spaced: bool) -> None:
    data = json.loads(event_json())
    del data["customer_charge_usd"]
    # Spaces before the colons send the event through the reference model.
    value = json.dumps(data, separators=(", ", " : ") if spaced else (",", ":")).encode()
    decoded = decode_usage_event(value, now=NOW)
    assert isinstance(decoded, UnpricedEvent)
    row = decoded.row
    assert (row.customer_charge_usd, row.charge_estimated, row.price_effective_from) == (
        Decimal(0),
        True,
        None,
    )
    assert row.gateway_request_id == data["gateway_request_id"]


def test_the_detail_stays_short_however_many_rules_are_broken() -> None:
    too_long = {
        name: "x" * 300 for name in ("gateway_request_id", "tenant_id", "provider", "model")
    }
    not_numbers = dict.fromkeys(
        ("input_tokens", "output_tokens", "total_tokens", "customer_charge_usd"), "many"
    )
    value = json.dumps({**too_long, **not_numbers, "occurred_at": "soon"}).encode()
    refused = rejection(value)
    assert refused.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert len(refused.detail) == MAX_DETAIL_CHARS
    assert refused.detail.endswith("…")
    assert refused.detail.startswith("gateway_request_id: at most 200 characters; tenant_id:")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
EVENT_LIKE = st.fixed_dictionaries(
    {},
    optional={
        name: JSON_VALUES | st.just(good)
        for name, good in json.loads(event_json(customer_charge_cents=1)).items()
    },
)


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_an_event_or_a_rejection_never_an_exception(value: bytes) -> None:
    assert isinstance(decode_usage_event(value, now=NOW), UsageRow | Rejection)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # slow only when busy
@given(EVENT_LIKE)
def test_any_json_object_decodes_to_an_event_or_a_schema_violation(data: dict[str, Any]) -> None:
    decoded = decode_usage_event(json.dumps(data).encode(), now=NOW)
    if isinstance(decoded, Rejection):
        assert decoded.reason is DeadLetterReason.SCHEMA_VIOLATION
        assert 0 < len(decoded.detail) <= MAX_DETAIL_CHARS
