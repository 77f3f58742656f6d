"""Reconcile's judgement from hand-made rows: each drift kind with its key and exact difference,
nothing when the rows agree, and the confirmation of lagging candidates."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from llm_usage.domain.budgets import AlertLevel, CounterKey
from llm_usage.domain.corrections import Action, Correction, Effective
from llm_usage.domain.reconcile import (
    EFFECTIVE_FIELDS,
    BudgetRecord,
    Drift,
    DriftKind,
    OpenHold,
    OutboxAlert,
    Policy,
    StuckWait,
    TopicAlerts,
    alerts_due,
    by_kind,
    compare_alerts,
    compare_budget_records,
    compare_counters,
    compare_effective,
    compare_holds,
    compare_invoices,
    compare_topic,
    compare_usage,
    compare_waits,
    confirmed,
    expected_invoices,
    needs_confirming,
)

DAY = date(2031, 5, 14)
MONTH = date(2031, 5, 1)
D = Decimal


def figures(requests: int, charge: str, *, estimated: str = "0") -> list[object]:
    """A dimension row: requests, input, output, cached, reasoning, total, charge, estimated."""
    return [requests, 100 * requests, 10 * requests, 0, 0, 110 * requests, D(charge), D(estimated)]


# Two events of t1 on DAY: dep-1/u-1 0.0054 and dep-1/no user 0.0100; one of t2.
SETS = {
    ("t1", "deployment", DAY, "dep-1"): figures(2, "0.0154"),
    ("t1", "model", DAY, "gpt"): figures(2, "0.0154"),
    ("t1", "provider", DAY, "openai"): figures(2, "0.0154"),
    ("t1", "user", DAY, "u-1"): figures(1, "0.0054"),
    ("t1", "user", DAY, None): figures(1, "0.0100"),
    ("t1", "agent", DAY, None): figures(2, "0.0154"),
    ("t1", "channel", DAY, None): figures(2, "0.0154"),
    ("t1", "feature", DAY, None): figures(2, "0.0154"),
    ("t2", "deployment", DAY, None): figures(1, "1.005"),
}


# The daily totals the deployment set makes.
TOTALS = {
    ("t1", "dep-1", DAY): [D("0.0154"), 200, 20, 2, D(0)],
    ("t2", None, DAY): [D("1.005"), 100, 10, 1, D(0)],
}


def stored_totals() -> dict[tuple[str, str | None, date], list[object]]:
    return {key: list(value) for key, value in TOTALS.items()}


def usage(
    totals: dict[tuple[str, str | None, date], list[object]],
    dimensions: dict[tuple[str, str, date, str | None], list[object]],
) -> list[Drift]:
    return compare_usage((TOTALS, totals), (SETS, dimensions))


def test_agreeing_rows_are_no_drift() -> None:
    dimensions = {key: list(value) for key, value in SETS.items()}
    assert usage(stored_totals(), dimensions) == []


def test_a_totals_row_off_names_its_figures_with_the_exact_difference() -> None:
    totals = stored_totals()
    totals[("t1", "dep-1", DAY)][0] = D("0.0155")
    [drift] = usage(totals, dict(SETS))
    assert drift.kind is DriftKind.USAGE_TOTAL
    assert drift.key == (("tenant_id", "t1"), ("deployment_id", "dep-1"), ("day", DAY))
    assert drift.difference == {"charge_usd": D("0.0001")}
    assert drift.text() == (
        "usage_total t1 dep-1 2031-05-14: charge_usd expected 0.0154 found 0.0155 "
        "difference +0.0001"
    )


def test_a_missing_totals_row_is_every_figure_negative() -> None:
    totals = stored_totals()
    del totals[("t2", None, DAY)]
    [drift] = usage(totals, dict(SETS))
    assert drift.found is None
    assert drift.difference == {
        "charge_usd": D("-1.005"),
        "input_tokens": -100,
        "output_tokens": -10,
        "requests": -1,
    }
    assert drift.as_json()["difference"]["charge_usd"] == "-1.005"
    assert "(no stored row)" in drift.text()


def test_an_extra_row_and_a_row_of_zeros() -> None:
    totals = stored_totals()
    totals[("t3", "dep-9", DAY)] = [D(0), 0, 0, 0, D(0)]  # zeros: no drift
    totals[("t4", "dep-9", DAY)] = [D("0.5"), 1, 1, 1, D(0)]
    [drift] = usage(totals, dict(SETS))
    assert drift.expected is None
    assert drift.key[0] == ("tenant_id", "t4")


def test_a_changed_dimension_row() -> None:
    dimensions = {key: list(value) for key, value in SETS.items()}
    dimensions[("t1", "user", DAY, "u-1")][0] = 2
    [drift] = usage(stored_totals(), dimensions)
    assert drift.kind is DriftKind.USAGE_DIMENSION
    assert drift.key == (("tenant_id", "t1"), ("dimension", "user"), ("day", DAY), ("key", "u-1"))
    assert drift.difference == {"requests": 1}


def test_a_counter_off_by_a_cent_and_a_missing_counter() -> None:
    spend = {
        ("t1", "tenant", "t1", "daily", DAY): D("0.0154"),
        ("t1", "user", "u-1", "monthly", MONTH): D("0.0054"),
        ("t2", "tenant", "t2", "daily", DAY): D("1.005"),
    }
    counters = dict(spend)
    counters[("t1", "user", "u-1", "monthly", MONTH)] += D("0.01")
    del counters[("t2", "tenant", "t2", "daily", DAY)]
    counters[("t3", "tenant", "t3", "daily", DAY)] = D(0)  # a counter of zero: no drift
    drifts = compare_counters(spend, counters)
    assert [(d.key[1:3], d.expected, d.found, d.difference) for d in drifts] == [
        ((("scope_type", "user"), ("scope_id", "u-1")), D("0.0054"), D("0.0154"), D("0.0100")),
        ((("scope_type", "tenant"), ("scope_id", "t2")), D("1.005"), 0, D("-1.005")),
    ]
    assert drifts[0].text() == (
        "budget_counter t1 user u-1 monthly 2031-05-01: expected 0.0054 found 0.0154 "
        "difference +0.0100"
    )


def test_closed_month_invoices_bill_the_rounded_total_or_the_period_charge() -> None:
    charges = {("t1", "dep-1", "2031-05"): D("0.0154"), ("t2", None, "2031-05"): D("1.005")}
    expected = expected_invoices(charges, {("t2", None, "2031-05"): D("20")})
    assert expected == {("t1", "dep-1", "2031-05"): 2, ("t2", None, "2031-05"): 2000}
    assert compare_invoices(expected, dict(expected)) == []
    [drift] = compare_invoices(expected, {**expected, ("t1", "dep-1", "2031-05"): 3})
    assert (drift.kind, drift.expected, drift.found, drift.difference) == (
        DriftKind.INVOICE_TOTAL,
        2,
        3,
        1,
    )


def test_the_hold_ledger_against_the_open_holds() -> None:
    hold = OpenHold("t1", "dep-1", None, None, DAY, D("0.30"))
    held = {
        ("t1", "tenant", "t1", "daily", DAY): D("0.30"),
        ("t1", "tenant", "t1", "monthly", MONTH): D("0.30"),
        ("t1", "deployment", "dep-1", "daily", DAY): D("0.30"),
        ("t1", "deployment", "dep-1", "monthly", MONTH): D("0.30"),
        ("t1", "user", "u-1", "daily", DAY): D("0"),  # every hold ended: nothing held
    }
    assert compare_holds([hold], held) == []
    held[("t1", "tenant", "t1", "monthly", MONTH)] = D("1.30")
    [drift] = compare_holds([hold], held)
    assert (drift.kind, drift.difference) == (DriftKind.HOLD_LEDGER, D("1.00"))


POLICY_SET = datetime(2031, 5, 2, tzinfo=UTC)


def policy(**limits: Decimal | None) -> Policy:
    return Policy(
        "t1",
        "tenant",
        "t1",
        limits.get("daily"),
        limits.get("monthly"),
        80,
        POLICY_SET,
    )


def test_alerts_the_current_policy_calls_for() -> None:
    spend = {
        ("t1", "tenant", "t1", "monthly", MONTH): D("9"),
        ("t1", "tenant", "t1", "daily", DAY): D("9"),
    }
    due = alerts_due(spend, [policy(monthly=D(10), daily=D(9))])
    monthly = CounterKey.from_spend_key(("t1", "tenant", "t1", "monthly", MONTH))
    daily = CounterKey.from_spend_key(("t1", "tenant", "t1", "daily", DAY))
    assert set(due) == {
        monthly.alert_id(AlertLevel.WARNING, D(10)),
        daily.alert_id(AlertLevel.WARNING, D(9)),
        daily.alert_id(AlertLevel.EXCEEDED, D(9)),
    }
    # A daily period before the policy's day is not re-examined; the month holding it is.
    early = {("t1", "tenant", "t1", "daily", date(2031, 5, 1)): D("9")}
    assert alerts_due(early, [policy(daily=D(9))]) == {}


def outbox(alert_id: str, *, published: bool = True, overdue: bool = False) -> OutboxAlert:
    at = datetime(2031, 5, 14, 12, tzinfo=UTC) if published else None
    return OutboxAlert(alert_id, "t1", published, overdue, at)


def test_alerts_missing_unpublished_and_not_on_the_topic() -> None:
    counter = CounterKey.from_spend_key(("t1", "tenant", "t1", "monthly", MONTH))
    due = {"a-due": counter, "a-stored": counter}
    rows = [outbox("a-stored"), outbox("a-late", published=False, overdue=True)]
    rows.append(outbox("a-young", published=False))
    drifts = compare_alerts(due, rows, {"a-stored": 1})
    assert [(d.kind, dict(d.key)["alert_id"], d.difference) for d in drifts] == [
        (DriftKind.ALERT_MISSING, "a-due", -1),
        (DriftKind.ALERT_UNPUBLISHED, "a-late", -1),
    ]
    # On the topic but not in the outbox: that kind only (compare_topic), not missing too.
    assert compare_alerts({"a-sent": counter}, [], {"a-sent": 1}) == []
    gone = compare_alerts({}, [outbox("a-stored")], {})
    assert [(d.kind, d.found) for d in gone] == [(DriftKind.ALERT_NOT_ON_TOPIC, 0)]
    # Published before what the topic still retains: retention, not drift.
    later = datetime(2031, 5, 15, tzinfo=UTC)
    assert compare_alerts({}, [outbox("a-stored")], {}, retained_since=later) == []
    assert compare_alerts({}, [outbox("a-stored")], None) == []  # the topic was not read


def test_the_topic_against_the_outbox() -> None:
    topic = TopicAlerts(
        {"a1": 1, "a2": 2, "a3": 1, "other": 3, "old": 1},
        {
            "a1": ("t1", DAY),
            "a2": ("t1", MONTH),
            "a3": ("t1", DAY),
            "other": ("t9", DAY),
            "old": ("t1", date(2031, 4, 30)),
        },
    )
    mine = topic.of(["t1"], MONTH, date(2031, 6, 1))
    assert mine == {"a1": 1, "a2": 2, "a3": 1}
    drifts = compare_topic({i: ("t1", n) for i, n in mine.items()}, ["a1", "a2"])
    assert [(d.kind, dict(d.key)["alert_id"], d.expected, d.found) for d in drifts] == [
        (DriftKind.ALERT_TWICE_ON_TOPIC, "a2", 1, 2),
        (DriftKind.ALERT_NOT_IN_OUTBOX, "a3", 0, 1),
    ]


def counter_drift(difference: str) -> Drift:
    key = (("tenant_id", "t1"), ("scope_type", "tenant"))
    return Drift(DriftKind.BUDGET_COUNTER, key, D(1), D(1) + D(difference), D(difference))


def test_lagging_candidates_count_only_when_read_again_with_the_same_difference() -> None:
    usage_drifts = usage({}, dict(SETS))
    stays, moves, goes = counter_drift("0.01"), counter_drift("0.02"), counter_drift("0.03")
    first = [*usage_drifts, stays, moves]
    assert needs_confirming(first) == [stays, moves]
    second = [stays, counter_drift("0.05")]
    assert confirmed(first, second) == [*usage_drifts, stays]
    assert confirmed([goes], []) == []


def test_json_lines_carry_exact_strings_and_every_kind_is_counted() -> None:
    drift = counter_drift("0.0100")
    line = json.loads(json.dumps(drift.as_json()))
    assert line == {
        "kind": "budget_counter",
        "key": {"tenant_id": "t1", "scope_type": "tenant"},
        "expected": "1",
        "found": "1.0100",
        "difference": "0.0100",
    }
    counts = by_kind([drift, drift])
    assert counts["budget_counter"] == 2
    assert set(counts) == {kind.value for kind in DriftKind}
    assert sum(counts.values()) == 2


EVENT_AT = datetime(2031, 5, 14, 9, tzinfo=UTC)
EVENT = ("t1", EVENT_AT, "req-1")
STORED = Effective("dep-1", "u-1", None, 100, 10, 0, 0, 110, D("0.0054"), 1, False)


def correction(correction_id: str, minute: int, action: Action, **fields: object) -> Correction:
    return Correction(
        tenant_id="t1",
        correction_id=correction_id,
        gateway_request_id="req-1",
        action=action,
        fields=fields,
        reason="r",
        actor="a",
        occurred_at=EVENT_AT + timedelta(minutes=minute),
        event_occurred_at=EVENT_AT,
    )


def test_the_effective_row_is_the_original_with_the_winner_laid_over_it() -> None:
    amend = correction("c1", 1, Action.AMEND, deployment_id="dep-2", input_tokens=50)
    void = correction("c0", 0, Action.VOID)  # older: loses
    right = replace(STORED, deployment_id="dep-2", input_tokens=50, total_tokens=60)
    history = {EVENT: [void, amend]}
    assert compare_effective({EVENT: STORED}, history, {EVENT: right}) == []
    wrong = replace(right, input_tokens=51, deployment_id="dep-3")
    [drift] = compare_effective({EVENT: STORED}, history, {EVENT: wrong})
    assert drift.kind is DriftKind.CORRECTION_EFFECTIVE
    assert drift.key == (
        ("tenant_id", "t1"),
        ("occurred_at", EVENT_AT),
        ("gateway_request_id", "req-1"),
    )
    assert drift.difference == {"deployment_id": "dep-3", "input_tokens": 1}
    assert drift.as_json()["key"]["occurred_at"] == "2031-05-14T09:00:00+00:00"


def test_an_effective_row_without_history_or_history_without_a_row() -> None:
    [extra] = compare_effective({EVENT: STORED}, {}, {EVENT: STORED})
    assert (extra.expected, extra.found is not None) == (None, True)
    void = correction("c0", 0, Action.VOID)
    [lost] = compare_effective({EVENT: STORED}, {EVENT: [void]}, {})
    assert lost.found is None
    # Every field that is not null as expected, found as none.
    assert lost.difference == {name: None for name in EFFECTIVE_FIELDS if name != "agent_id"}
    # An event no longer stored (retention) is not judged.
    assert compare_effective({}, {EVENT: [void]}, {}) == []


def test_waits_past_their_deadline_are_stuck() -> None:
    drifts = compare_waits([StuckWait("budget", "t2", "c9"), StuckWait("usage", "t1", "c1")])
    assert [(d.kind, d.key, d.difference) for d in drifts] == [
        (
            DriftKind.CORRECTION_STUCK,
            (("tenant_id", "t1"), ("consumer", "usage"), ("correction_id", "c1")),
            1,
        ),
        (
            DriftKind.CORRECTION_STUCK,
            (("tenant_id", "t2"), ("consumer", "budget"), ("correction_id", "c9")),
            1,
        ),
    ]


def test_the_budget_consumer_records_every_applied_correction_and_no_other() -> None:
    records = [
        BudgetRecord("t1", "c1", applied=True, recorded=True),
        BudgetRecord("t1", "c2", applied=True, recorded=False),  # not applied to the counters
        BudgetRecord("t1", "c3", applied=False, recorded=True),  # applied though judged unknown
        BudgetRecord("t1", "c4", applied=False, recorded=False),
    ]
    drifts = compare_budget_records(records)
    assert [(d.key[1][1], d.expected, d.found, d.difference) for d in drifts] == [
        ("c2", 1, 0, -1),
        ("c3", 0, 1, 1),
    ]
    assert needs_confirming(drifts) == drifts  # the budget consumer may still be catching up
