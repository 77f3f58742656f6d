"""The API's answers, validated from the values storage returns, say what the rest of the house
says: the same fields and the same exact spelling of money, days and percents."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from llm_usage.api.ingest import check_events
from llm_usage.api.models import (
    BudgetAnswer,
    DailyItemAnswer,
    IngestAnswer,
    InvoiceLineAnswer,
    PolicyAnswer,
    PolicyChangeAnswer,
    UsageBreakdownAnswer,
    UsageSummaryAnswer,
    UsageTodayAnswer,
)
from llm_usage.domain.budgets import BudgetWindow, Enforcement, ScopeType, budget_status
from llm_usage.domain.invoices import InvoiceLine
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.storage.usage_dimensions import Dimension
from llm_usage.storage.usage_reports import BreakdownItem, DailyItem, UsageSummary


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("12.0054"), "12.0054"),
        (Decimal("12.50"), "12.5"),
        (Decimal("1E+2"), "100"),
        (Decimal("0.000"), "0"),
        (Decimal("0.0000000001"), "0.0000000001"),
    ],
)
def test_money_is_the_one_exact_spelling(amount: Decimal, text: str) -> None:
    item = BreakdownItem(
        key=None,
        requests=1,
        input_tokens=2,
        output_tokens=3,
        cached_input_tokens=1,
        reasoning_tokens=1,
        total_tokens=5,
        customer_charge_usd=amount,
        estimated_charge_usd=amount,
    )
    answer = UsageBreakdownAnswer(by=Dimension.MODEL, from_="a", to="b", items=[item])
    dumped = answer.model_dump(mode="json", by_alias=True)["items"][0]
    assert (dumped["customer_charge_usd"], dumped["estimated_charge_usd"]) == (text, text)


def test_a_summary_answer_is_the_totals_with_their_range() -> None:
    summary = UsageSummary(
        requests=2,
        input_tokens=10,
        output_tokens=20,
        cached_input_tokens=3,
        reasoning_tokens=4,
        total_tokens=37,
        customer_charge_usd=Decimal("0.5000"),
        estimated_charge_usd=Decimal("0.1200"),
    )
    today = UsageTodayAnswer(
        from_="2026-11-24T00:00:00Z", to="2026-11-24T12:00:00Z", **vars(summary)
    )
    answer = UsageSummaryAnswer(
        tenant_id="t1",
        from_="2026-11-01T00:00:00Z",
        to="2026-11-24T12:00:00Z",
        today=today,
        **vars(summary),
    )
    figures = {
        "requests": 2,
        "input_tokens": 10,
        "output_tokens": 20,
        "cached_input_tokens": 3,
        "reasoning_tokens": 4,
        "total_tokens": 37,
        "customer_charge_usd": "0.5",
        "estimated_charge_usd": "0.12",
    }
    assert answer.model_dump(mode="json", by_alias=True) == {
        "tenant_id": "t1",
        "from": "2026-11-01T00:00:00Z",
        "to": "2026-11-24T12:00:00Z",
        **figures,
        "today": {"from": "2026-11-24T00:00:00Z", "to": "2026-11-24T12:00:00Z", **figures},
    }


def test_a_day_is_named_by_its_date() -> None:
    item = DailyItem(
        day=date(2026, 2, 28),
        requests=3,
        customer_charge_usd=Decimal("1.10"),
        estimated_charge_usd=Decimal(0),
    )
    assert DailyItemAnswer.model_validate(item).model_dump(mode="json") == {
        "date": "2026-02-28",
        "requests": 3,
        "customer_charge_usd": "1.1",
        "estimated_charge_usd": "0",
    }


@pytest.mark.parametrize(
    ("spend", "limit", "held", "enforcement"),
    [
        ("0", "100", "0", Enforcement.ALERT),
        ("80", "100", "0.000", Enforcement.BLOCK),
        ("33.3333", "100.00", "12.50", Enforcement.BLOCK),
        ("150", "1E+2", "1E-18", Enforcement.ALERT),
        ("1", "3", "2", Enforcement.BLOCK),
    ],
)
def test_a_budget_answer_is_the_status_as_budget_status_prints_it(
    spend: str, limit: str, held: str, enforcement: Enforcement
) -> None:
    status = budget_status(
        scope_type=ScopeType.USER,
        scope_id="u1",
        window=BudgetWindow.MONTHLY,
        period_start=date(2026, 11, 1),
        spend_usd=Decimal(spend),
        limit_usd=Decimal(limit),
        warn_threshold_pct=80,
        held_usd=Decimal(held),
        enforcement=enforcement,
    )
    assert BudgetAnswer.model_validate(status).model_dump(mode="json") == status.to_json()


@pytest.mark.parametrize(
    "policy",
    [
        BudgetPolicy("t1", ScopeType.TENANT, "t1", daily_limit_usd=Decimal("10.50")),
        BudgetPolicy(
            "t1",
            ScopeType.DEPLOYMENT,
            "d1",
            monthly_limit_usd=Decimal("1E+3"),
            warn_threshold_pct=50,
        ),
        BudgetPolicy(
            "t1", ScopeType.AGENT, "a1", Decimal(1), Decimal(9), enforcement=Enforcement.BLOCK
        ),
    ],
)
def test_a_policy_answer_is_the_policy_as_stored_and_audited(policy: BudgetPolicy) -> None:
    answer = PolicyChangeAnswer(result="replaced", policy=policy, previous=None)
    assert answer.model_dump(mode="json") == {
        "result": "replaced",
        "policy": policy.to_json(),
        "previous": None,
    }
    assert PolicyAnswer.model_validate(policy.to_json()) == answer.policy


@pytest.mark.parametrize("closed", [True, False])
def test_an_invoice_line_answer_is_the_line_as_rollup_run_prints_it(closed: bool) -> None:
    line = InvoiceLine(
        tenant_id="t1",
        period="2026-11",
        deployment_id=None,
        kind="llm_usage",
        qty=30,
        amount_cents=12,
        description="LLM tokens",
        meta={"requests": 2},
        closed=closed,
        unit_price_cents=None,
    )
    assert InvoiceLineAnswer.model_validate(line).model_dump(mode="json") == line.as_json()


def test_ingest_results_say_accepted_or_why_rejected() -> None:
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    checked = check_events(
        [
            {
                "gateway_request_id": "r1",
                "tenant_id": "t1",
                "customer_charge_usd": "0.5",
                "occurred_at": "2026-11-24T11:00:00Z",
            },
            "not an object",
        ],
        now=now,
    )
    results = IngestAnswer(results=checked).model_dump(mode="json")["results"]
    assert results[0] == {
        "gateway_request_id": "r1",
        "status": "accepted",
        "reason": None,
        "detail": None,
    }
    assert results[1]["status"] == "rejected"
    assert results[1]["reason"] == "schema_violation"
    assert results[1]["gateway_request_id"] is None
