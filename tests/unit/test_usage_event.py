"""Every rule of the usage event v1, on both sides of each boundary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from llm_usage.schemas.usage_event import (
    BIGINT_MAX,
    CONFLICT_FIELDS,
    MissingNowError,
    UnpricedEvent,
    UsageEvent,
    conflicting_fields,
    usage_row,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ABSENT = object()  # an override that removes the field

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
)
DECIMAL_FIELDS = ("upstream_cost_usd", "customer_charge_usd")
TEXT_FIELDS = (
    "deployment_id",
    "user_id",
    "agent_id",
    "channel",
    "feature",
    "provider",
    "model",
    "request_kind",
)
ID_FIELDS = ("gateway_request_id", "tenant_id")


def event_data(**overrides: Any) -> dict[str, Any]:
    """A valid event as json.loads would hand it over, with `overrides` applied."""
    data: dict[str, Any] = {
        "event_type": "llm_usage_recorded",
        "schema_version": 1,
        "gateway_request_id": "req-1",
        "tenant_id": "acme",
        "deployment_id": "support-bot",
        "input_tokens": 1200,
        "output_tokens": 300,
        "customer_charge_usd": "0.0054",
        "occurred_at": "2026-11-14T09:00:00Z",
    }
    data.update(overrides)
    return {name: value for name, value in data.items() if value is not ABSENT}


def validate(data: dict[str, Any], *, now: datetime = NOW) -> UsageEvent:
    return UsageEvent.model_validate(data, context={"now": now})


def error_types(data: dict[str, Any]) -> list[tuple[tuple[int | str, ...], str]]:
    with pytest.raises(ValidationError) as raised:
        validate(data)
    return [(error["loc"], error["type"]) for error in raised.value.errors()]


def test_a_minimal_event_gets_the_contract_defaults() -> None:
    event = validate(
        {
            "gateway_request_id": "r",
            "tenant_id": "t",
            "customer_charge_usd": "0",
            "occurred_at": "2026-11-14T09:00:00Z",
        }
    )
    assert event.event_type == "llm_usage_recorded"
    assert event.schema_version == 1
    assert (event.deployment_id, event.user_id, event.agent_id) == (None, None, None)
    assert (event.channel, event.feature, event.provider) == (None, None, None)
    assert (event.model, event.request_kind, event.markup_mode) == (None, None, None)
    assert [getattr(event, name) for name in TOKEN_FIELDS] == [0, 0, 0, 0, 0]
    assert event.upstream_cost_usd is None
    assert event.customer_charge_cents is None


# --- accepted values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("event_type", "llm_usage_recorded", "llm_usage_recorded"),
        ("event_type", ABSENT, "llm_usage_recorded"),
        ("schema_version", 1, 1),
        ("schema_version", ABSENT, 1),
        ("gateway_request_id", "r", "r"),
        ("gateway_request_id", "r" * 200, "r" * 200),
        ("tenant_id", "t" * 200, "t" * 200),
        ("tenant_id", "münchen-☃", "münchen-☃"),
        ("deployment_id", None, None),
        ("deployment_id", ABSENT, None),
        ("deployment_id", "", ""),
        ("user_id", "u" * 200, "u" * 200),
        ("channel", "c" * 200, "c" * 200),
        ("agent_id", "agent-7", "agent-7"),
        ("channel", None, None),
        ("feature", "chat", "chat"),
        ("provider", "p" * 200, "p" * 200),
        ("model", "m" * 200, "m" * 200),
        ("request_kind", None, None),
        ("input_tokens", 0, 0),
        ("total_tokens", BIGINT_MAX, BIGINT_MAX),
        ("cached_input_tokens", 17, 17),
        ("cached_input_tokens", BIGINT_MAX, BIGINT_MAX),
        ("reasoning_tokens", BIGINT_MAX, BIGINT_MAX),
        ("total_tokens", 0, 0),
        ("total_tokens", 999, 999),
        ("markup_mode", "flat_percent", "flat_percent"),
        ("markup_mode", "fixed_per_token", "fixed_per_token"),
        ("markup_mode", "plan_inclusive", "plan_inclusive"),
        ("markup_mode", "tiered_by_volume", "tiered_by_volume"),  # a mode added later is stored
        ("markup_mode", "k" * 200, "k" * 200),
        ("markup_mode", None, None),
        ("upstream_cost_usd", None, None),
        ("upstream_cost_usd", "0.0045", Decimal("0.0045")),
        ("customer_charge_usd", "0.123456789012345678", Decimal("0.123456789012345678")),
        ("customer_charge_usd", "123456789012", Decimal("123456789012")),
        (
            "customer_charge_usd",
            "999999999999.999999999999999999",
            Decimal("999999999999.999999999999999999"),
        ),
        ("customer_charge_usd", "1e-18", Decimal("1E-18")),
        ("customer_charge_usd", "1.5E+11", Decimal("150000000000")),
        ("customer_charge_usd", Decimal("12345678901.234567891"), Decimal("12345678901.234567891")),
        ("customer_charge_usd", 7, Decimal(7)),
        ("customer_charge_usd", "0", Decimal(0)),
        ("customer_charge_usd", "-0", Decimal(0)),
        ("customer_charge_usd", Decimal("-0.00"), Decimal(0)),
    ],
)
def test_values_within_the_rules_are_accepted(field: str, value: object, expected: object) -> None:
    event = validate(event_data(**{field: value}))
    actual = getattr(event, field)
    assert actual == expected
    assert type(actual) is type(expected)


def test_decimals_keep_the_digits_they_were_written_with() -> None:
    event = validate(event_data(customer_charge_usd="0.50", upstream_cost_usd="0.4100"))
    assert str(event.customer_charge_usd) == "0.50"
    assert str(event.upstream_cost_usd) == "0.4100"


def test_negative_zero_is_stored_as_zero() -> None:
    event = validate(event_data(customer_charge_usd="-0.00"))
    assert not event.customer_charge_usd.is_signed()


def test_unknown_fields_are_ignored() -> None:
    event = validate(event_data(trace_id="abc", nested={"a": [1, 2.5]}, customer_charge_eur="9"))
    assert "trace_id" not in event.model_dump()
    assert not hasattr(event, "customer_charge_eur")


# --- refused values ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (ABSENT, "missing"),
        ("", "string_too_short"),
        ("x" * 201, "string_too_long"),
        (None, "string_type"),
        (42, "string_type"),
        (Decimal("4.2"), "string_type"),
        (True, "string_type"),
        ("a\x00b", "string_pattern_mismatch"),
        ("a\ud800b", "string_unicode"),
        ("\udfff", "string_unicode"),
    ],
)
def test_ids_must_be_1_to_200_characters_of_storable_text(
    field: str, value: object, error: str
) -> None:
    assert error_types(event_data(**{field: value})) == [((field,), error)]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("x" * 201, "string_too_long"),
        (7, "string_type"),
        (False, "string_type"),
        (["a"], "string_type"),
        ("dep\x00", "string_pattern_mismatch"),
        ("\x00", "string_pattern_mismatch"),
        ("\ud800", "string_unicode"),
        ("gpt\ud83d", "string_unicode"),
    ],
)
def test_optional_text_is_null_or_at_most_200_characters_of_storable_text(
    field: str, value: object, error: str
) -> None:
    assert error_types(event_data(**{field: value})) == [((field,), error)]


@pytest.mark.parametrize("field", TOKEN_FIELDS)
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, "greater_than_equal"),
        (BIGINT_MAX + 1, "less_than_equal"),
        (10**30, "less_than_equal"),
        (True, "int_type"),
        (False, "int_type"),
        (Decimal("5.0"), "int_type"),
        (Decimal("5"), "int_type"),
        (5.0, "int_type"),
        ("5", "int_type"),
        (None, "int_type"),
    ],
)
def test_token_counts_are_whole_numbers_from_0_to_bigint_max(
    field: str, value: object, error: str
) -> None:
    assert error_types(event_data(**{field: value})) == [((field,), error)]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, "greater_than_equal"),
        (BIGINT_MAX + 1, "less_than_equal"),
        (True, "int_type"),
        (Decimal("50.0"), "int_type"),
        ("1", "int_type"),
    ],
)
def test_charge_cents_is_a_whole_number_from_0_to_bigint_max(value: object, error: str) -> None:
    data = event_data(customer_charge_cents=value)
    assert error_types(data) == [(("customer_charge_cents",), error)]


@pytest.mark.parametrize("field", DECIMAL_FIELDS)
@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0.1234567890123456789", "decimal_max_places"),
        ("1.0000000000000000000", "decimal_max_places"),
        ("1e-19", "decimal_max_places"),
        (Decimal("0.0000000000000000001"), "decimal_max_places"),
        ("1234567890123", "decimal_whole_digits"),
        ("1234567890123.5", "decimal_whole_digits"),
        ("1e12", "decimal_whole_digits"),
        (Decimal("1E+12"), "decimal_whole_digits"),
        (10**12, "decimal_whole_digits"),
        ("-0.01", "greater_than_equal"),
        (Decimal("-1"), "greater_than_equal"),
        (-1, "greater_than_equal"),
        ("NaN", "decimal_text"),
        ("nan", "decimal_text"),
        ("Infinity", "decimal_text"),
        ("-Infinity", "decimal_text"),
        (Decimal("NaN"), "finite_number"),
        (Decimal("sNaN"), "finite_number"),
        (Decimal("Infinity"), "finite_number"),
        (" 1.5", "decimal_text"),
        ("1.5 ", "decimal_text"),
        ("1_000", "decimal_text"),
        ("+1", "decimal_text"),
        ("0x10", "decimal_text"),
        ("01.5", "decimal_text"),
        (".5", "decimal_text"),
        ("1.", "decimal_text"),
        ("", "decimal_text"),
        ("١٢", "decimal_text"),  # Arabic-Indic digits, which Decimal() would read
        (0.5, "decimal_exact_type"),
        (0.0, "decimal_exact_type"),
        (True, "decimal_exact_type"),
        ([], "decimal_exact_type"),
        ({"amount": "1"}, "decimal_exact_type"),
    ],
)
def test_decimals_are_exact_finite_non_negative_with_at_most_12_and_18_digits(
    field: str, value: object, error: str
) -> None:
    assert error_types(event_data(**{field: value})) == [((field,), error)]


def test_a_binary_float_never_reaches_money() -> None:
    with pytest.raises(ValidationError, match="not a binary float"):
        validate(event_data(customer_charge_usd=0.1))


@pytest.mark.parametrize("value", ["llm_budget_alert", "", "LLM_USAGE_RECORDED", None, 1])
def test_event_type_when_present_must_be_llm_usage_recorded(value: object) -> None:
    assert error_types(event_data(event_type=value)) == [(("event_type",), "literal_error")]


@pytest.mark.parametrize("value", [2, 0, True, 1.0, Decimal(1), "1", None])
def test_schema_version_when_present_must_be_the_integer_1(value: object) -> None:
    assert error_types(event_data(schema_version=value)) == [
        (("schema_version",), "schema_version")
    ]


@pytest.mark.parametrize("value", ["percent", "FLAT_PERCENT", "", "k" * 200])
def test_markup_mode_is_an_open_string_stored_as_sent(value: str) -> None:
    assert validate(event_data(markup_mode=value)).markup_mode == value


@pytest.mark.parametrize(
    ("value", "error"),
    [("k" * 201, "string_too_long"), (1, "string_type"), ("a\x00b", "string_pattern_mismatch")],
)
def test_markup_mode_is_refused_only_when_it_cannot_be_stored(value: object, error: str) -> None:
    assert error_types(event_data(markup_mode=value)) == [(("markup_mode",), error)]


# --- occurred_at ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "utc"),
    [
        ("2026-11-14T09:00:00Z", datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("2026-11-14t09:00:00z", datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("2026-11-14 09:00:00+00:00", datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("2026-11-14T09:00:00-00:00", datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("2026-11-14T14:30:00+05:30", datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("2026-11-14T01:00:00-08:00", datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("2026-10-31T20:00:00-08:00", datetime(2026, 11, 1, 4, 0, tzinfo=UTC)),
        ("2026-11-14T09:00:00.120Z", datetime(2026, 11, 14, 9, 0, 0, 120000, tzinfo=UTC)),
        ("2026-11-14T09:00:00.123456789Z", datetime(2026, 11, 14, 9, 0, 0, 123456, tzinfo=UTC)),
        ("0001-01-01T00:00:00.000001Z", datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
        ("0001-01-01T00:00:00-01:00", datetime(1, 1, 1, 1, tzinfo=UTC)),
    ],
)
def test_occurred_at_with_any_offset_is_normalised_to_utc(value: str, utc: datetime) -> None:
    occurred_at = validate(event_data(occurred_at=value)).occurred_at
    assert occurred_at == utc
    assert occurred_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("2026-11-14T09:00:00", "rfc3339_datetime"),
        ("2026-11-14 09:00:00", "rfc3339_datetime"),
        ("2026-11-14", "rfc3339_datetime"),
        ("2026-11-14T09:00Z", "rfc3339_datetime"),
        ("2026-11-14T09:00:00+0530", "rfc3339_datetime"),
        ("2026-11-14T09:00:00+05", "rfc3339_datetime"),
        ("2026-11-14T09:00:00,5Z", "rfc3339_datetime"),
        ("2026-11-14T09:00:00.Z", "rfc3339_datetime"),
        ("2026-02-30T09:00:00Z", "rfc3339_datetime"),
        ("2026-11-14T24:00:00Z", "rfc3339_datetime"),
        ("2026-11-14T09:00:60Z", "rfc3339_datetime"),
        ("2026-11-14T09:00:00+24:00", "rfc3339_datetime"),
        ("1763110800", "rfc3339_datetime"),
        (1763110800, "rfc3339_datetime"),
        (Decimal("1763110800.5"), "rfc3339_datetime"),
        (True, "rfc3339_datetime"),
        (None, "rfc3339_datetime"),
        ("", "rfc3339_datetime"),
        ("2026-11-14T09:00:00Z\n", "rfc3339_datetime"),
        (datetime(2026, 11, 14, 9, tzinfo=UTC), "rfc3339_datetime"),
        (ABSENT, "missing"),
        ("0001-01-01T00:00:00+00:01", "datetime_out_of_range"),
        ("9999-12-31T23:59:59-00:01", "datetime_out_of_range"),
        ("0001-01-01T00:00:00Z", "datetime_out_of_range"),
        ("0001-01-01T01:00:00+01:00", "datetime_out_of_range"),
    ],
)
def test_occurred_at_must_be_an_rfc3339_string_with_an_offset(value: object, error: str) -> None:
    assert error_types(event_data(occurred_at=value)) == [(("occurred_at",), error)]


@pytest.mark.parametrize(
    ("occurred_at", "error"),
    [
        ("9999-12-31T23:59:59.999998Z", None),
        ("9999-12-31T23:59:59.999999Z", "datetime_out_of_range"),
        ("9999-12-31T23:59:59.9999999Z", "datetime_out_of_range"),
    ],
)
def test_the_last_instant_of_the_calendar_is_refused_as_the_driver_stores_it_as_infinity(
    occurred_at: str, error: str | None
) -> None:
    data = event_data(occurred_at=occurred_at)
    far_future = datetime.max.replace(tzinfo=UTC)
    if error is None:
        assert validate(data, now=far_future).occurred_at.year == 9999
    else:
        with pytest.raises(ValidationError, match=error):
            validate(data, now=far_future)


@pytest.mark.parametrize(
    ("occurred_at", "accepted"),
    [
        ("2026-11-23T12:05:00Z", True),
        ("2026-11-23T12:05:00.000001Z", False),
        ("2026-11-23T17:35:00+05:30", True),
        ("2026-11-23T17:35:00.000001+05:30", False),
        ("2026-11-23T04:05:00-08:00", True),
        ("2026-11-23T04:05:01-08:00", False),
        ("2026-11-23T12:00:00Z", True),
        ("2016-11-23T12:00:00Z", True),
    ],
)
def test_occurred_at_is_at_most_5_minutes_after_now(occurred_at: str, accepted: bool) -> None:
    data = event_data(occurred_at=occurred_at)
    if accepted:
        assert validate(data).occurred_at <= NOW + timedelta(minutes=5)
    else:
        assert error_types(data) == [(("occurred_at",), "datetime_in_future")]


def test_now_in_another_zone_means_the_same_instant() -> None:
    now_in_kolkata = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    data = event_data(occurred_at="2026-11-23T12:05:00Z")
    assert validate(data, now=now_in_kolkata).occurred_at == NOW + timedelta(minutes=5)


@pytest.mark.parametrize(
    "context",
    [None, {}, {"now": None}, {"now": "2026-11-23T12:00:00Z"}, {"now": NOW.replace(tzinfo=None)}],
    ids=["no context", "empty", "null now", "string now", "naive now"],
)
def test_validating_without_an_aware_now_is_a_bug_not_a_rejection(context: object) -> None:
    with pytest.raises(MissingNowError, match="now"):
        UsageEvent.model_validate(event_data(), context=context)
    assert not issubclass(MissingNowError, ValueError)


# --- charges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usd", "cents", "accepted"),
    [
        ("0.50", 50, True),
        ("0.50", 49, True),
        ("0.50", 51, True),
        ("0.50", 48, False),
        ("0.50", 52, False),
        ("0.125", 13, True),  # half up: 12.5 cents is 13
        ("0.125", 14, True),
        ("0.125", 12, True),
        ("0.125", 15, False),
        ("0.125", 11, False),  # would pass if 12.5 were rounded half to even
        ("0.0054", 0, True),
        ("0.0054", 1, True),
        ("0.0054", 2, True),
        ("0.0054", 3, False),
        ("0", 0, True),
        ("0", 1, True),
        ("0", 2, False),
        ("999999999999.995", 100000000000001, True),
        ("999999999999.995", 99999999999998, False),
    ],
)
def test_both_charges_must_agree_within_one_cent(usd: str, cents: int, accepted: bool) -> None:
    data = event_data(customer_charge_usd=usd, customer_charge_cents=cents)
    if accepted:
        event = validate(data)
        assert (event.customer_charge_usd, event.customer_charge_cents) == (Decimal(usd), cents)
    else:
        assert error_types(data) == [((), "charge_disagreement")]


@pytest.mark.parametrize(
    ("cents", "usd"),
    [
        (0, "0.00"),
        (1, "0.01"),
        (5, "0.05"),
        (150, "1.50"),
        (99999999999999, "999999999999.99"),
    ],
)
def test_with_only_cents_the_exact_charge_is_cents_over_100(cents: int, usd: str) -> None:
    event = validate(event_data(customer_charge_usd=ABSENT, customer_charge_cents=cents))
    assert str(event.customer_charge_usd) == usd
    assert event.customer_charge_cents == cents


def test_with_only_cents_the_charge_still_has_at_most_12_digits_before_the_point() -> None:
    data = event_data(customer_charge_usd=ABSENT, customer_charge_cents=100000000000000)
    assert error_types(data) == [((), "cents_too_large")]


def test_with_only_usd_cents_stay_absent() -> None:
    event = validate(event_data(customer_charge_usd="0.0054"))
    assert event.customer_charge_cents is None
    assert event.customer_charge_usd == Decimal("0.0054")


def test_without_either_charge_the_event_is_left_to_the_price_table() -> None:
    event = validate(event_data(customer_charge_usd=ABSENT))
    assert event.customer_charge_usd is None
    unpriced = usage_row(event)
    assert isinstance(unpriced, UnpricedEvent)
    assert unpriced.row.charge_estimated


def test_a_null_exact_charge_is_refused_rather_than_read_as_absent() -> None:
    data = event_data(customer_charge_usd=None, customer_charge_cents=1)
    assert error_types(data) == [(("customer_charge_usd",), "decimal_exact_type")]


def test_null_cents_read_as_not_sent() -> None:
    assert validate(event_data(customer_charge_cents=None)).customer_charge_cents is None
    data = event_data(customer_charge_usd=ABSENT, customer_charge_cents=None)
    assert isinstance(usage_row(validate(data)), UnpricedEvent)


# --- total_tokens --------------------------------------------------------------------------


def test_total_tokens_defaults_to_input_plus_output() -> None:
    event = validate(event_data(input_tokens=1200, output_tokens=300, cached_input_tokens=5))
    assert event.total_tokens == 1500


def test_total_tokens_sent_by_the_gateway_is_kept_as_sent() -> None:
    assert validate(event_data(input_tokens=1, output_tokens=2, total_tokens=10)).total_tokens == 10


def test_a_default_total_beyond_bigint_is_refused() -> None:
    data = event_data(input_tokens=BIGINT_MAX, output_tokens=1)
    assert error_types(data) == [((), "total_tokens_overflow")]
    assert validate({**data, "total_tokens": BIGINT_MAX}).total_tokens == BIGINT_MAX


# --- the model -----------------------------------------------------------------------------


def test_an_event_cannot_be_changed_after_validation() -> None:
    event = validate(event_data())
    with pytest.raises(ValidationError, match="frozen"):
        event.tenant_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [
        event_data(),
        event_data(customer_charge_usd=ABSENT, customer_charge_cents=5, total_tokens=7),
        event_data(occurred_at="2026-11-14T14:30:00.123456+05:30", upstream_cost_usd="1E-7"),
    ],
)
def test_an_event_dumped_to_json_validates_to_the_same_event(data: dict[str, Any]) -> None:
    event = validate(data)
    assert validate(event.model_dump(mode="json")) == event


def test_all_broken_rules_are_reported_together() -> None:
    data = event_data(tenant_id="", input_tokens=-1, markup_mode="x" * 201)
    assert error_types(data) == [
        (("tenant_id",), "string_too_short"),
        (("input_tokens",), "greater_than_equal"),
        (("markup_mode",), "string_too_long"),
    ]


# --- conflicting duplicates ----------------------------------------------------------------


def conflict_view(event: UsageEvent) -> dict[str, object]:
    return {name: getattr(event, name) for name in CONFLICT_FIELDS}


def test_conflict_fields_are_the_ones_the_contract_names() -> None:
    assert CONFLICT_FIELDS == (
        "tenant_id",
        "deployment_id",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "total_tokens",
        "customer_charge_usd",
        "occurred_at",
    )


@pytest.mark.parametrize(
    "republished",
    [
        event_data(),
        dict(reversed(event_data().items())),
        event_data(customer_charge_usd=Decimal("0.0054")),
        event_data(customer_charge_usd="0.00540"),
        event_data(occurred_at="2026-11-14T14:30:00+05:30"),
        event_data(occurred_at="2026-11-14T01:00:00-08:00"),
        event_data(total_tokens=1500),
        event_data(customer_charge_cents=1, model="gpt-4o", user_id="u-9", trace="x"),
    ],
    ids=[
        "identical",
        "other key order",
        "number instead of string",
        "trailing zero",
        "+05:30 offset",
        "-08:00 offset",
        "explicit default total",
        "non-conflict fields differ",
    ],
)
def test_a_reserialised_duplicate_is_not_a_conflict(republished: dict[str, Any]) -> None:
    first = conflict_view(validate(event_data()))
    assert conflicting_fields(first, conflict_view(validate(republished))) == []


@pytest.mark.parametrize(
    ("changes", "conflicts"),
    [
        ({"input_tokens": 1201}, ["input_tokens", "total_tokens"]),
        ({"input_tokens": 1201, "total_tokens": 1500}, ["input_tokens"]),
        ({"cached_input_tokens": 1}, ["cached_input_tokens"]),
        ({"reasoning_tokens": 1}, ["reasoning_tokens"]),
        ({"tenant_id": "globex"}, ["tenant_id"]),
        ({"deployment_id": None}, ["deployment_id"]),
        ({"customer_charge_usd": "0.0055"}, ["customer_charge_usd"]),
        ({"occurred_at": "2026-11-14T09:00:00.000001Z"}, ["occurred_at"]),
        ({"tenant_id": "globex", "customer_charge_usd": "1"}, ["tenant_id", "customer_charge_usd"]),
    ],
)
def test_a_changed_fact_is_a_conflict(changes: dict[str, Any], conflicts: list[str]) -> None:
    first = conflict_view(validate(event_data()))
    assert conflicting_fields(first, conflict_view(validate(event_data(**changes)))) == conflicts


@pytest.mark.parametrize(
    ("stored_charge", "stored_time"),
    [
        (Decimal("0.005400"), datetime(2026, 11, 14, 9, 0, tzinfo=UTC)),
        ("0.0054", "2026-11-14T09:00:00+00:00"),
        (Decimal("0.0054"), datetime(2026, 11, 14, 10, 0, tzinfo=timezone(timedelta(hours=1)))),
    ],
    ids=["numeric from PostgreSQL", "strings", "stored in another zone"],
)
def test_stored_values_compare_by_value_not_by_representation(
    stored_charge: object, stored_time: object
) -> None:
    incoming = conflict_view(validate(event_data()))
    stored = {**incoming, "customer_charge_usd": stored_charge, "occurred_at": stored_time}
    assert conflicting_fields(stored, incoming) == []


def test_a_missing_stored_value_reads_as_null() -> None:
    incoming = conflict_view(validate(event_data(deployment_id=None)))
    stored = {name: value for name, value in incoming.items() if name != "deployment_id"}
    assert conflicting_fields(stored, incoming) == []
