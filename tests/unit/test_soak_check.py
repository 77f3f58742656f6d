from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from llm_usage.domain.budgets import AlertLevel, BudgetWindow, ScopeType, alert_id_for
from llm_usage.domain.reconcile import Drift, DriftKind
from llm_usage.rollup.reconcile import ReconcileReport
from llm_usage.soak.check import (
    PolicyVersion,
    compare_aborted,
    compare_alerts,
    compare_dead_letters,
    compare_stored,
    expected_alerts,
    reconcile_rows,
    spend_from_events,
)
from llm_usage.soak.ledger import Ledger, SentEvent, value_digest

NOV = datetime(2026, 11, 1, 10, tzinfo=UTC)


def event(
    request_id: str, charge: str, *, deployment: str | None = "d1", at: datetime = NOV
) -> SentEvent:
    return SentEvent(
        gateway_request_id=request_id,
        tenant_id="t1",
        deployment_id=deployment,
        user_id=None,
        agent_id=None,
        customer_charge_usd=Decimal(charge),
        input_tokens=10,
        output_tokens=5,
        occurred_at=at,
        acked_at=0.0,
    )


def ledger_of(*events: SentEvent) -> Ledger:
    ledger = Ledger()
    for sent in events:
        ledger.record_event(sent)
    return ledger


def test_stored_events_must_be_exactly_the_acknowledged_ones_with_their_values() -> None:
    a, b = event("a", "0.5"), event("b", "0.25")
    ledger = ledger_of(a, b)
    assert compare_stored(ledger, {"a": a, "b": b}, 2).ok
    assert not compare_stored(ledger, {"a": a}, 1).ok  # lost
    assert not compare_stored(ledger, {"a": a, "b": b, "c": event("c", "1")}, 3).ok  # invented
    changed = event("b", "0.250000000000000001")
    row = compare_stored(ledger, {"a": a, "b": changed}, 2)
    assert not row.ok
    assert "other values b" in row.detail


def test_an_aborted_id_stored_or_counted_fails() -> None:
    assert compare_aborted({"x"}, ["a"], ["a"]).ok
    assert not compare_aborted({"x"}, ["a"], ["x"]).ok


def test_dead_letters_must_each_be_deserved_and_none_missing() -> None:
    ledger = Ledger()
    ledger.expect_dead_letter(b"{", "invalid_json")
    ledger.expect_dead_letter(b"[]", "schema_violation")
    good = [(value_digest(b"{"), "invalid_json"), (value_digest(b"[]"), "schema_violation")]
    assert compare_dead_letters(ledger, good).ok
    assert compare_dead_letters(ledger, [*good, good[0]]).ok  # a copy after a crash
    assert not compare_dead_letters(ledger, good[:1]).ok
    assert not compare_dead_letters(ledger, [*good, (value_digest(b"{}"), "invalid_json")]).ok
    assert not compare_dead_letters(ledger, [good[0], (value_digest(b"[]"), "invalid_json")]).ok


def test_spend_per_scope_and_period_is_summed_from_raw_events() -> None:
    spend = spend_from_events([event("a", "0.1"), event("b", "0.2", deployment=None)])
    assert spend[("t1", "tenant", "t1", "daily", date(2026, 11, 1))] == Decimal("0.3")
    assert spend[("t1", "deployment", "d1", "monthly", date(2026, 11, 1))] == Decimal("0.1")
    assert ("t1", "deployment", "d1", "daily", date(2026, 11, 1)) in spend


def test_sums_keep_every_digit_of_30_digit_charges() -> None:
    # Decimal's default context keeps 28 digits: these sums would round there.
    charges = ["999999999999.999999999999999999", "0.000000000000000001"]
    events = [event("a", charges[0]), event("b", charges[1])]
    exact = Decimal("1000000000000.000000000000000000")
    assert spend_from_events(events)[("t1", "tenant", "t1", "monthly", date(2026, 11, 1))] == exact
    odd = [event("a", "0.000000000000000001"), event("b", "123456789012.345678901234567891")]
    total = spend_from_events(odd)[("t1", "tenant", "t1", "daily", date(2026, 11, 1))]
    assert total == Decimal("123456789012.345678901234567892")


def alert(limit: str, level: AlertLevel, start: date = date(2026, 11, 1)) -> str:
    return alert_id_for(
        tenant_id="t1",
        scope_type=ScopeType.TENANT,
        scope_id="t1",
        window=BudgetWindow.MONTHLY,
        period_start=start,
        level=level,
        limit_usd=Decimal(limit),
    )


def version(limit: str, at: datetime) -> PolicyVersion:
    policy = {"warn_threshold_pct": 80, "monthly_limit_usd": limit, "daily_limit_usd": None}
    return PolicyVersion(("t1", "tenant", "t1"), policy, at)


def test_expected_alerts_follow_the_final_spend_and_the_policy_in_effect() -> None:
    spend = {
        ("t1", "tenant", "t1", "monthly", date(2026, 10, 1)): Decimal("9"),
        ("t1", "tenant", "t1", "monthly", date(2026, 11, 1)): Decimal("8"),
    }
    history = {
        ("t1", "tenant", "t1"): [
            version("1000", datetime(2026, 10, 31, tzinfo=UTC)),
            version("10", NOV),
        ]
    }
    expected, forbidden = expected_alerts(spend, history)
    assert expected == {alert("10", AlertLevel.WARNING)}
    assert alert("10", AlertLevel.EXCEEDED) in forbidden  # 8 < 10
    assert alert("10", AlertLevel.WARNING, date(2026, 10, 1)) in forbidden  # before it was set
    assert alert("1000", AlertLevel.WARNING) in forbidden  # superseded
    arrived = [
        {"alert_id": a, "spend_usd": "8", "limit_usd": "10", "threshold_pct": 80} for a in expected
    ]
    assert compare_alerts(expected, forbidden, arrived).ok
    assert not compare_alerts(expected, forbidden, arrived * 2).ok  # twice
    assert not compare_alerts(expected, forbidden, []).ok  # missing
    extra = {
        "alert_id": alert("1000", AlertLevel.WARNING),
        "spend_usd": "800",
        "limit_usd": "1000",
        "threshold_pct": 80,
    }
    assert not compare_alerts(expected, forbidden, [*arrived, extra]).ok


def _report(*drifts: Drift) -> ReconcileReport:
    return ReconcileReport(["2026-11"], list(drifts), 3, 0.1, 0.0)


def test_reconcile_s_drifts_fail_the_derived_or_the_invoice_row() -> None:
    derived, invoices = reconcile_rows(_report(), {"2026-11"})
    assert derived.ok
    assert invoices.ok
    counter = Drift(
        DriftKind.BUDGET_COUNTER,
        (("tenant_id", "t1"),),
        Decimal("0.30"),
        Decimal("0.31"),
        Decimal("0.01"),
    )
    derived, invoices = reconcile_rows(_report(counter), {"2026-11"})
    assert not derived.ok
    assert invoices.ok
    assert "budget_counter t1" in derived.detail
    line = Drift(DriftKind.INVOICE_TOTAL, (("tenant_id", "t1"),), 1, 2, 1)
    derived, invoices = reconcile_rows(_report(line), {"2026-11"})
    assert derived.ok
    assert not invoices.ok
    _, unclosed = reconcile_rows(_report(), set())
    assert not unclosed.ok  # no month closed: the soak did not test the invoices
