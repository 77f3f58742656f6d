"""The budget check's body: the event's id rules, exact numbers, exactly one form of estimate."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from llm_usage.schemas.budget_check import (
    BudgetCheckRequest,
    MalformedCheckError,
    parse_budget_check,
)

BASE = {"gateway_request_id": "req-1", "tenant_id": "acme"}
TOKENS = {
    "provider": "openai",
    "model": "gpt-4o",
    "estimated_input_tokens": 1000,
    "estimated_output_tokens": 500,
}


def _body(**fields: Any) -> bytes:
    return json.dumps({**BASE, **fields}).encode()


def _errors(body: bytes) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        parse_budget_check(body)
    return [(tuple(error["loc"]), error["msg"]) for error in caught.value.errors()]


@pytest.mark.parametrize(
    ("literal", "exact"),
    [
        ('"1.25"', Decimal("1.25")),
        ("1.25", Decimal("1.25")),
        ("0.1", Decimal("0.1")),  # a binary float would be 0.1000000000000000055...
        ("1E-7", Decimal("1E-7")),
        ('"0.000000000000000001"', Decimal("0.000000000000000001")),
        ("999999999999.999999999999999999", Decimal("999999999999.999999999999999999")),
        ("7", Decimal(7)),
        ("0", Decimal(0)),
        ("-0", Decimal(0)),
    ],
)
def test_a_charge_is_read_exactly_from_its_digits(literal: str, exact: Decimal) -> None:
    body = b'{"gateway_request_id": "r", "tenant_id": "t", "estimated_charge_usd": %s}' % (
        literal.encode()
    )
    charge = parse_budget_check(body).estimated_charge_usd
    assert charge == exact
    assert isinstance(charge, Decimal)
    assert str(charge) == str(exact)


@pytest.mark.parametrize(
    "literal",
    [
        '"-1"',
        "-0.01",
        '"0.0000000000000000001"',  # 19 places
        '"1000000000000"',  # 13 whole digits
        '"1,5"',
        '"NaN"',
        "true",
        "null",
        '""',
    ],
)
def test_a_charge_that_breaks_the_money_rules_is_refused(literal: str) -> None:
    body = b'{"gateway_request_id": "r", "tenant_id": "t", "estimated_charge_usd": %s}' % (
        literal.encode()
    )
    if literal == "null":  # null is "not sent": then no estimate at all
        assert _errors(body)[0][0] == ()
    else:
        assert [loc for loc, _ in _errors(body)] == [("estimated_charge_usd",)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gateway_request_id", ""),
        ("gateway_request_id", " padded"),
        ("gateway_request_id", "x" * 201),
        ("gateway_request_id", "tab\there"),
        ("gateway_request_id", 7),
        ("tenant_id", ""),
        ("tenant_id", "trailing "),
        ("tenant_id", None),
        ("deployment_id", "x" * 201),
        ("user_id", "nul\x00"),
        ("agent_id", 5),
    ],
)
def test_ids_and_attributions_follow_the_events_rules(field: str, value: Any) -> None:
    errors = _errors(_body(estimated_charge_usd="1", **{field: value}))
    assert (field,) in [loc for loc, _ in errors]


def test_ids_are_required() -> None:
    body = json.dumps({"estimated_charge_usd": "1"}).encode()
    assert sorted(loc for loc, _ in _errors(body)) == [("gateway_request_id",), ("tenant_id",)]


def test_attributions_may_be_null_or_absent_and_unknown_fields_are_ignored() -> None:
    check = parse_budget_check(
        _body(estimated_charge_usd="2", deployment_id=None, user_id="u-1", colour="red")
    )
    assert (check.deployment_id, check.user_id, check.agent_id) == (None, "u-1", None)
    assert check.estimated_charge_usd == Decimal(2)


def test_the_tokens_form_defaults_cached_and_reasoning_to_zero() -> None:
    check = parse_budget_check(_body(**TOKENS))
    assert check.estimated_charge_usd is None
    assert (check.provider, check.model) == ("openai", "gpt-4o")
    assert (check.input_tokens, check.output_tokens) == (1000, 500)
    assert (check.cached_input_tokens, check.reasoning_tokens) == (0, 0)
    full = parse_budget_check(
        _body(**TOKENS, estimated_cached_input_tokens=200, estimated_reasoning_tokens=500)
    )
    assert (full.cached_input_tokens, full.reasoning_tokens) == (200, 500)


def test_both_forms_is_refused_naming_the_fields() -> None:
    [(loc, message)] = _errors(_body(estimated_charge_usd="1", **TOKENS))
    assert loc == ()
    assert "not both" in message
    assert "estimated_input_tokens" in message
    assert "estimated_output_tokens" in message


def test_neither_form_is_refused_naming_both() -> None:
    [(loc, message)] = _errors(_body())
    assert loc == ()
    assert "estimated_charge_usd" in message
    assert "estimated_input_tokens" in message


@pytest.mark.parametrize("left_out", ["provider", "model", *list(TOKENS)[2:]])
def test_an_incomplete_tokens_form_names_what_is_missing(left_out: str) -> None:
    fields = {name: value for name, value in TOKENS.items() if name != left_out}
    [(loc, message)] = _errors(_body(**fields))
    assert loc == ()
    assert left_out in message


def test_a_charge_beside_provider_and_model_is_the_charge_form() -> None:
    check = parse_budget_check(_body(estimated_charge_usd="3", provider="openai", model="m"))
    assert check.estimated_charge_usd == Decimal(3)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"estimated_cached_input_tokens": 1001}, "estimated_cached_input_tokens"),
        ({"estimated_reasoning_tokens": 501}, "estimated_reasoning_tokens"),
    ],
)
def test_a_part_larger_than_its_whole_is_refused(extra: dict[str, int], named: str) -> None:
    [(_, message)] = _errors(_body(**TOKENS, **extra))
    assert named in message


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, 2**63, None])
def test_token_counts_are_whole_numbers_of_bigint(value: Any) -> None:
    fields = {**TOKENS, "estimated_input_tokens": value}
    errors = _errors(_body(**fields))
    if value is None:  # null is "not sent": the form is incomplete
        assert "estimated_input_tokens" in errors[0][1]
    else:
        assert [loc for loc, _ in errors] == [("estimated_input_tokens",)]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[]", "an array"),
        (b'"x"', "a string"),
        (b"{not json", "not JSON"),
        (b"\xff", "not UTF-8"),
        (b'{"tenant_id": "a", "tenant_id": "b"}', "named twice"),
        (b'{"estimated_charge_usd": NaN}', "not JSON"),
    ],
)
def test_a_body_that_is_not_one_json_object_says_why(body: bytes, why: str) -> None:
    with pytest.raises(MalformedCheckError, match=why):
        parse_budget_check(body)


def test_the_model_is_frozen() -> None:
    check = BudgetCheckRequest.model_validate({**BASE, "estimated_charge_usd": "1"})
    with pytest.raises(ValidationError):
        check.tenant_id = "other"  # type: ignore[misc]
