"""A budget policy's rules, and where a spend stands against its limits: pure, table-tested."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_usage.cli.main import run
from llm_usage.domain.budgets import (
    BudgetLevel,
    BudgetWindow,
    Enforcement,
    ScopeType,
    budget_level,
    budget_status,
    percent_of_limit,
)
from llm_usage.domain.policies import BudgetPolicy, InvalidPolicyError, policy_from_text

D = Decimal


def _text(**overrides: str | None) -> dict[str, str | None]:
    arguments: dict[str, str | None] = {
        "tenant_id": "acme",
        "scope_type": "deployment",
        "scope_id": "dep-7",
        "daily_limit_usd": "100",
        "monthly_limit_usd": None,
        "warn_threshold_pct": None,
        "enforcement": None,
    }
    arguments.update(overrides)
    return arguments


def _dep(
    daily: str | None = "100",
    monthly: str | None = None,
    pct: int = 80,
    enforcement: Enforcement = Enforcement.ALERT,
) -> BudgetPolicy:
    return BudgetPolicy(
        tenant_id="acme",
        scope_type=ScopeType.DEPLOYMENT,
        scope_id="dep-7",
        daily_limit_usd=None if daily is None else D(daily),
        monthly_limit_usd=None if monthly is None else D(monthly),
        warn_threshold_pct=pct,
        enforcement=enforcement,
    )


def _scope(scope_type: ScopeType, scope_id: str) -> BudgetPolicy:
    return BudgetPolicy("acme", scope_type, scope_id, D(100))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, _dep()),
        ({"daily_limit_usd": None, "monthly_limit_usd": "2500.5"}, _dep(None, "2500.5")),
        ({"monthly_limit_usd": "1000", "warn_threshold_pct": "1"}, _dep("100", "1000", 1)),
        ({"warn_threshold_pct": "99"}, _dep(pct=99)),
        # The tenant scope's id is the tenant id: implied, or given equal.
        ({"scope_type": "tenant", "scope_id": None}, _scope(ScopeType.TENANT, "acme")),
        ({"scope_type": "tenant", "scope_id": "acme"}, _scope(ScopeType.TENANT, "acme")),
        ({"scope_type": "user", "scope_id": "u 1"}, _scope(ScopeType.USER, "u 1")),
        ({"scope_type": "agent"}, _scope(ScopeType.AGENT, "dep-7")),
        # Exact, whatever the spelling: the smallest and largest amounts the contract allows.
        ({"daily_limit_usd": "0.000000000000000001"}, _dep("1E-18")),
        (
            {"daily_limit_usd": "999999999999.999999999999999999"},
            _dep("999999999999.999999999999999999"),
        ),
        ({"daily_limit_usd": "1e2"}, _dep("100")),
        ({"daily_limit_usd": "100.00"}, _dep("100")),
        ({"daily_limit_usd": ".5"}, _dep("0.5")),
        ({"daily_limit_usd": "+7"}, _dep("7")),
        ({"daily_limit_usd": "0.1"}, _dep("0.1")),
        ({"enforcement": "alert"}, _dep()),
        ({"enforcement": "block"}, _dep(enforcement=Enforcement.BLOCK)),
    ],
)
def test_valid_policy_text(overrides: dict[str, str | None], expected: BudgetPolicy) -> None:
    policy = policy_from_text(**_text(**overrides))  # type: ignore[arg-type]
    assert policy == expected
    assert isinstance(policy.scope_type, ScopeType)
    assert isinstance(policy.enforcement, Enforcement)
    assert policy.enforcement is expected.enforcement
    for window, limit in policy.limits():
        assert isinstance(limit, Decimal)
        assert limit == expected.limit_for(window)


def test_a_limit_is_read_from_its_digits_never_through_a_float() -> None:
    policy = policy_from_text(**_text(daily_limit_usd="0.1", monthly_limit_usd="0.3"))  # type: ignore[arg-type]
    assert policy.daily_limit_usd == D("0.1") != D(0.1)
    assert policy.monthly_limit_usd == D("0.3")


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"daily_limit_usd": "0"}, "daily_limit_usd", "more than 0"),
        ({"daily_limit_usd": "0.000"}, "daily_limit_usd", "more than 0"),
        ({"daily_limit_usd": "-0"}, "daily_limit_usd", "more than 0"),
        ({"daily_limit_usd": "-5"}, "daily_limit_usd", "more than 0"),
        ({"monthly_limit_usd": "-0.01"}, "monthly_limit_usd", "more than 0"),
        ({"daily_limit_usd": "abc"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": ""}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": "NaN"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": "Infinity"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": "1_000"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": " 100"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": "$100"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": "1,5"}, "daily_limit_usd", "must be a number"),
        ({"daily_limit_usd": "0.0000000000000000001"}, "daily_limit_usd", "18 digits after"),
        ({"daily_limit_usd": "1.0000000000000000000"}, "daily_limit_usd", "18 digits after"),
        ({"daily_limit_usd": "1000000000000"}, "daily_limit_usd", "12 digits before"),
        ({"monthly_limit_usd": "1e12"}, "monthly_limit_usd", "12 digits before"),
        ({"warn_threshold_pct": "0"}, "warn_threshold_pct", "from 1 to 99"),
        ({"warn_threshold_pct": "100"}, "warn_threshold_pct", "from 1 to 99"),
        ({"warn_threshold_pct": "-5"}, "warn_threshold_pct", "from 1 to 99"),
        ({"warn_threshold_pct": "80.5"}, "warn_threshold_pct", "whole number"),
        ({"warn_threshold_pct": "eighty"}, "warn_threshold_pct", "whole number"),
        # Arabic-Indic digits, which int() would read as 80.
        ({"warn_threshold_pct": "\u0668\u0660"}, "warn_threshold_pct", "whole number"),
        ({"daily_limit_usd": None}, None, "needs a daily limit, a monthly limit or both"),
        ({"scope_type": "team"}, "scope_type", "one of tenant, deployment, user, agent"),
        ({"scope_type": "Tenant"}, "scope_type", "one of tenant, deployment, user, agent"),
        ({"scope_id": None}, "scope_id", "required when the scope is deployment"),
        ({"scope_type": "user", "scope_id": None}, "scope_id", "required when the scope is user"),
        ({"scope_id": ""}, "scope_id", "1 to 200 characters"),
        ({"scope_id": "x" * 201}, "scope_id", "1 to 200 characters"),
        ({"scope_type": "tenant", "scope_id": "other"}, "scope_id", "is the tenant id"),
        ({"tenant_id": ""}, "tenant_id", "1 to 200 characters"),
        ({"tenant_id": " acme"}, "tenant_id", "no leading or trailing whitespace"),
        ({"tenant_id": "ac\tme"}, "tenant_id", "no control characters"),
        ({"enforcement": "deny"}, "enforcement", "one of alert, block, not 'deny'"),
        ({"enforcement": "Block"}, "enforcement", "one of alert, block"),
        ({"enforcement": ""}, "enforcement", "one of alert, block"),
    ],
)
def test_invalid_policy_text_names_the_field(
    overrides: dict[str, str | None], field: str | None, fragment: str
) -> None:
    with pytest.raises(InvalidPolicyError) as raised:
        policy_from_text(**_text(**overrides))  # type: ignore[arg-type]
    assert raised.value.field == field
    assert fragment in raised.value.problem


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"daily_limit_usd": 100.0}, "daily_limit_usd"),  # a float never becomes a limit
        ({"daily_limit_usd": 100}, "daily_limit_usd"),
        ({"daily_limit_usd": D("NaN")}, "daily_limit_usd"),
        ({"daily_limit_usd": D("Infinity")}, "daily_limit_usd"),
        ({"warn_threshold_pct": True}, "warn_threshold_pct"),
        ({"warn_threshold_pct": 80.0}, "warn_threshold_pct"),
        ({"scope_type": "team"}, "scope_type"),
        ({"scope_type": ScopeType.TENANT}, "scope_id"),
        ({"scope_id": "a\x00b"}, "scope_id"),
        ({"tenant_id": None}, "tenant_id"),
        ({"enforcement": "deny"}, "enforcement"),
        ({"enforcement": None}, "enforcement"),
        ({"enforcement": True}, "enforcement"),
    ],
)
def test_a_policy_is_valid_by_construction(fields: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {
        "tenant_id": "acme",
        "scope_type": ScopeType.DEPLOYMENT,
        "scope_id": "dep-7",
        "daily_limit_usd": D(100),
    }
    with pytest.raises(InvalidPolicyError) as raised:
        BudgetPolicy(**{**values, **fields})
    assert raised.value.field == field


def test_limit_for_each_window_and_the_key() -> None:
    policy = BudgetPolicy("acme", ScopeType.USER, "u1", None, D("250.5"), 90)
    assert policy.limit_for(BudgetWindow.DAILY) is None
    assert policy.limit_for(BudgetWindow.MONTHLY) == D("250.5")
    assert policy.limits() == [(BudgetWindow.MONTHLY, D("250.5"))]
    both = BudgetPolicy("acme", ScopeType.USER, "u1", D(10), D(250))
    assert both.limits() == [(BudgetWindow.DAILY, D(10)), (BudgetWindow.MONTHLY, D(250))]
    assert policy.key == ("acme", "user", "u1")
    assert {("acme", "user", "u1"): 1}[policy.key] == 1


def test_json_has_exact_decimal_strings_and_reads_back() -> None:
    policy = BudgetPolicy("acme", ScopeType.AGENT, "bot", D("100.00"), D("1E-18"), 75)
    assert policy.to_json() == {
        "tenant_id": "acme",
        "scope_type": "agent",
        "scope_id": "bot",
        "daily_limit_usd": "100",
        "monthly_limit_usd": "0.000000000000000001",
        "warn_threshold_pct": 75,
        "enforcement": "alert",
    }
    assert BudgetPolicy.from_json(policy.to_json()) == policy
    only_daily = BudgetPolicy("acme", ScopeType.TENANT, "acme", D("5"))
    assert only_daily.to_json()["monthly_limit_usd"] is None
    assert BudgetPolicy.from_json(only_daily.to_json()) == only_daily
    with pytest.raises(InvalidPolicyError):
        BudgetPolicy.from_json({**policy.to_json(), "daily_limit_usd": 100.0})


def test_enforcement_is_part_of_the_policy_and_of_its_json() -> None:
    alerting = _dep()
    blocking = _dep(enforcement=Enforcement.BLOCK)
    # A change of enforcement alone is a change (set_policy audits it), never "unchanged".
    assert alerting != blocking
    assert alerting == _dep(enforcement="alert")  # type: ignore[arg-type]
    assert blocking.to_json()["enforcement"] == "block"
    read_back = BudgetPolicy.from_json(blocking.to_json())
    assert read_back == blocking
    assert read_back.enforcement is Enforcement.BLOCK
    # Audit entries written before enforcement existed: those policies only alerted.
    older = {key: value for key, value in blocking.to_json().items() if key != "enforcement"}
    assert BudgetPolicy.from_json(older).enforcement is Enforcement.ALERT
    with pytest.raises(InvalidPolicyError) as raised:
        BudgetPolicy.from_json({**blocking.to_json(), "enforcement": "deny"})
    assert raised.value.field == "enforcement"


# limit 100, warning at 80%: the warning threshold is 80, exactly.
@pytest.mark.parametrize(
    ("spend", "limit", "pct", "level"),
    [
        ("0", "100", 80, BudgetLevel.OK),
        ("79.999999999999999999", "100", 80, BudgetLevel.OK),
        ("80", "100", 80, BudgetLevel.WARNING),
        ("80.000", "100", 80, BudgetLevel.WARNING),
        ("99.999999999999999999", "100", 80, BudgetLevel.WARNING),
        ("100", "100", 80, BudgetLevel.EXCEEDED),
        ("100.000000000000000001", "100", 80, BudgetLevel.EXCEEDED),
        ("5000", "100", 80, BudgetLevel.EXCEEDED),
        # A threshold with more digits than either operand: 0.000000000000000003 x 33 / 100.
        ("0.00000000000000000099", "0.000000000000000003", 33, BudgetLevel.WARNING),
        ("0.00000000000000000098", "0.000000000000000003", 33, BudgetLevel.OK),
        ("0.000000000000000003", "0.000000000000000003", 33, BudgetLevel.EXCEEDED),
        ("33.33", "33.33", 1, BudgetLevel.EXCEEDED),
        ("0.3333", "33.33", 1, BudgetLevel.WARNING),
        ("0.3332", "33.33", 1, BudgetLevel.OK),
        ("98.01", "99", 99, BudgetLevel.WARNING),
        ("98.0099", "99", 99, BudgetLevel.OK),
    ],
)
def test_budget_level_at_and_around_each_threshold(
    spend: str, limit: str, pct: int, level: BudgetLevel
) -> None:
    assert budget_level(D(spend), D(limit), pct) is level


@pytest.mark.parametrize(
    ("spend", "limit", "percent"),
    [
        ("0", "100", "0.00"),
        ("80", "100", "80.00"),
        ("100", "100", "100.00"),
        ("150", "100", "150.00"),
        ("1", "3", "33.33"),
        ("2", "3", "66.67"),
        ("1", "7", "14.29"),
        ("0.12345", "10", "1.23"),
        ("0.1235", "10", "1.24"),  # exactly half: up
        ("0.0001245", "0.01", "1.25"),
        ("0.000000000000000001", "999999999999.999999999999999999", "0.00"),
        (
            "999999999999.999999999999999999",
            "0.000000000000000001",
            "99999999999999999999999999999900.00",
        ),
        # 12.345 minus a hair after the 60th digit: rounding the quotient to 60 digits first
        # would make it 12.345 and then 12.35; the true percent rounds to 12.34.
        ("0.8641499999999999999999999999999999999999999999999999999999999999999999", "7", "12.34"),
    ],
)
def test_percent_rounds_half_up_to_two_places_exactly(spend: str, limit: str, percent: str) -> None:
    result = percent_of_limit(D(spend), D(limit))
    assert format(result, "f") == percent


def _oracle_percent(spend: Decimal, limit: Decimal) -> str:
    scaled = Fraction(spend) * 10000 / Fraction(limit)
    hundredths, remainder = divmod(scaled.numerator, scaled.denominator)
    if 2 * remainder >= scaled.denominator:
        hundredths += 1
    return f"{hundredths // 100}.{hundredths % 100:02d}"


_amounts = st.decimals(
    min_value=D("0.000000000000000001"),
    max_value=D("999999999999.999999999999999999"),
    places=18,
    allow_nan=False,
    allow_infinity=False,
)


@given(spend=st.one_of(st.just(D(0)), _amounts), limit=_amounts)
def test_percent_matches_exact_rational_rounding(spend: Decimal, limit: Decimal) -> None:
    assert format(percent_of_limit(spend, limit), "f") == _oracle_percent(spend, limit)


def test_status_line_json_has_the_contract_fields_as_exact_strings() -> None:
    status = budget_status(
        scope_type=ScopeType.DEPLOYMENT,
        scope_id="dep-7",
        window=BudgetWindow.MONTHLY,
        period_start=date(2026, 11, 1),
        spend_usd=D("81.20"),
        limit_usd=D("100.0"),
        warn_threshold_pct=80,
    )
    assert status.to_json() == {
        "scope_type": "deployment",
        "scope_id": "dep-7",
        "window": "monthly",
        "period_start": "2026-11-01",
        "spend_usd": "81.2",
        "limit_usd": "100",
        "percent": "81.20",
        "level": "warning",
        "held_usd": "0",
        "enforcement": "alert",
    }
    held = budget_status(
        scope_type=ScopeType.TENANT,
        scope_id="acme",
        window=BudgetWindow.DAILY,
        period_start=date(2026, 11, 3),
        spend_usd=D("99.5"),
        limit_usd=D("100"),
        warn_threshold_pct=80,
        held_usd=D("0.50000"),
        enforcement=Enforcement.BLOCK,
    )
    # The level is spend's alone: spend + held reaches the limit, spend does not.
    assert held.level is BudgetLevel.WARNING
    assert held.to_json()["held_usd"] == "0.5"
    assert held.to_json()["enforcement"] == "block"


_SET = ["policy", "set", "--tenant", "acme"]
_SET_TENANT = [*_SET, "--scope", "tenant"]
_LIMIT = ["--daily-limit-usd", "1"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([*_SET_TENANT, "--daily-limit-usd", "-5"], "--daily-limit-usd must be more than 0"),
        ([*_SET_TENANT, "--daily-limit-usd", "0"], "--daily-limit-usd must be more than 0"),
        ([*_SET_TENANT, "--monthly-limit-usd", "ten"], "--monthly-limit-usd must be a number"),
        ([*_SET_TENANT, *_LIMIT, "--warn-pct", "0"], "--warn-pct must be from 1 to 99"),
        ([*_SET_TENANT, *_LIMIT, "--warn-pct", "100"], "--warn-pct must be from 1 to 99"),
        (_SET_TENANT, "give --daily-limit-usd, --monthly-limit-usd or both"),
        ([*_SET, "--scope", "team", *_LIMIT], "--scope must be one of"),
        ([*_SET, "--scope", "deployment", *_LIMIT], "--scope-id is required"),
        ([*_SET_TENANT, "--scope-id", "other", *_LIMIT], "--scope-id of a tenant policy is"),
        ([*_SET_TENANT, *_LIMIT, "--actor", ""], "--actor must be 1 to 200"),
        ([*_SET_TENANT, *_LIMIT, "--enforcement", "deny"], "--enforcement must be one of alert"),
        ([*_SET_TENANT, *_LIMIT, "--enforcement"], "expected one argument"),
        (["policy", "set", "--scope", "tenant", *_LIMIT], "required: --tenant"),
        ([*_SET_TENANT, "--daily-limit-usd"], "expected one argument"),
        ([*_SET_TENANT, *_LIMIT, "--weekly-limit-usd", "5"], "unrecognized arguments"),
        (["policy", "delete", "--tenant", "acme", "--scope", "user"], "--scope-id is required"),
        (["policy", "delete", "--tenant", "acme", "--scope", "org"], "--scope must be one of"),
        (["policy", "list", "--tenant", ""], "--tenant must be 1 to 200"),
        (["policy", "list"], "required: --tenant"),
        (["policy", "history", "--tenant", "acme", "--bogus"], "unrecognized arguments: --bogus"),
        (["budget", "status"], "required: --tenant"),
        (["budget", "status", "--tenant", "acme", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_bad_policy_arguments_are_one_line_and_exit_2(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = run(argv)
    except SystemExit as exited:  # argparse's own checks exit from inside the parser
        code = exited.code  # type: ignore[assignment]
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("llm-usage: error: ")
    assert fragment in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["policy", "list", "--tenant", "acme"],
        ["policy", "history", "--tenant", "acme", "--json"],
        ["policy", "set", "--tenant", "acme", "--scope", "tenant", "--daily-limit-usd", "5"],
        ["policy", "delete", "--tenant", "acme", "--scope", "tenant"],
        ["budget", "status", "--tenant", "acme"],
    ],
)
def test_unreachable_database_is_one_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/nowhere")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot reach PostgreSQL" in err
