"""The soak checker's comparisons, each shown to pass on right data and to fail on wrong data."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from llm_usage.cli.soak.check import (
    BilledLine,
    InvoiceKey,
    PolicyVersion,
    billed_cents,
    compare_aborted,
    compare_alerts,
    compare_counters,
    compare_counts,
    compare_dead_letters,
    compare_invoices,
    compare_stored,
    decode_alerts,
    expected_alerts,
    invoice_totals,
    policy_history,
    spend_from_usage,
    stored_events,
    unreadable,
)
from llm_usage.cli.soak.ledger import SentEvent, value_digest
from llm_usage.core.clock import SimulatedClock
from llm_usage.schemas.budget import (
    AlertLevel,
    BudgetAlert,
    BudgetWindow,
    ScopeType,
    SpendKey,
    alert_id_for,
)
from llm_usage.schemas.budget_policy import BudgetPolicy

NOV = datetime(2026, 11, 14, 10, tzinfo=UTC)
NOV_1 = date(2026, 11, 1)
OCT_1 = date(2026, 10, 1)


def event(
    request_id: str,
    charge: str,
    *,
    tenant: str = "t1",
    deployment: str | None = "d1",
    user: str | None = None,
    at: datetime = NOV,
) -> SentEvent:
    return SentEvent(
        gateway_request_id=request_id,
        tenant_id=tenant,
        deployment_id=deployment,
        user_id=user,
        agent_id=None,
        customer_charge_usd=Decimal(charge),
        input_tokens=10,
        output_tokens=5,
        occurred_at=at,
        acked_at=0.0,
    )


def by_id(*events: SentEvent) -> dict[str, SentEvent]:
    return {e.gateway_request_id: e for e in events}


# --- 1. Stored once, nothing lost ---


A, B = event("a", "0.5"), event("b", "0.25")


def test_the_acknowledged_events_stored_with_their_values_pass() -> None:
    # The same amount and instant spelled otherwise (0.50, another offset) is the same value.
    b_as_stored = replace(
        B,
        customer_charge_usd=Decimal("0.250"),
        occurred_at=NOV.astimezone(timezone(timedelta(hours=2))),
    )
    row = compare_stored(by_id(A, B), stored_events(by_id(A, B), [A, b_as_stored]))
    assert row.ok, row
    assert row.name.startswith("events stored")  # the report finds its figure by this name
    assert row.found == "2 rows: 0 missing, 0 extra, 0 changed"


@pytest.mark.parametrize(
    ("rows", "detail"),
    [
        pytest.param([A], "missing b", id="a lost event"),
        pytest.param([A, B, event("c", "1")], "not sent c", id="an event nobody sent"),
        pytest.param(
            [A, event("b", "0.250000000000000001")], "other values b", id="a charge off by 1e-18"
        ),
        pytest.param(
            [A, replace(B, occurred_at=NOV + timedelta(milliseconds=1))], "other values b"
        ),
        pytest.param([A, replace(B, deployment_id=None)], "other values b", id="other deployment"),
        pytest.param([A, replace(B, output_tokens=6)], "other values b", id="other tokens"),
        pytest.param([A, B, B], "3 rows for 2 ids", id="an id stored twice"),
    ],
)
def test_a_lost_invented_changed_or_doubled_row_fails(rows: list[SentEvent], detail: str) -> None:
    row = compare_stored(by_id(A, B), stored_events(by_id(A, B), rows))
    assert not row.ok
    assert detail in row.detail


# --- 2. Nothing aborted stored ---


def test_an_aborted_id_stored_or_counted_fails() -> None:
    assert compare_aborted({"x"}, {"a"}, ["a"]).ok
    stored = compare_aborted({"x"}, {"a", "x"}, [])
    assert not stored.ok
    assert "stored x" in stored.detail
    counted = compare_aborted({"x"}, {"a"}, ["x"])
    assert not counted.ok
    assert "counted x" in counted.detail


# --- 3. Dead letters deserved ---

DESERVED = {value_digest(b"{"): "invalid_json", value_digest(b"[]"): "schema_violation"}
GOOD = [(value_digest(b"{"), "invalid_json"), (value_digest(b"[]"), "schema_violation")]


def test_dead_letters_each_deserved_pass_and_copies_after_a_crash_are_counted() -> None:
    assert compare_dead_letters(DESERVED, GOOD).ok
    copied = compare_dead_letters(DESERVED, [*GOOD, GOOD[0]])
    assert copied.ok
    assert "1 extra copies" in copied.found


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(GOOD[:1], id="a deserved dead letter missing"),
        pytest.param([*GOOD, (value_digest(b"{}"), "invalid_json")], id="one not deserved"),
        pytest.param([GOOD[0], (value_digest(b"[]"), "invalid_json")], id="the wrong reason"),
        pytest.param([GOOD[0], (value_digest(b"[]"), None)], id="no reason header"),
    ],
)
def test_a_dead_letter_missing_or_not_deserved_fails(records: list[tuple[str, str | None]]) -> None:
    assert not compare_dead_letters(DESERVED, records).ok


# --- 4. Budget counters = raw sums ---


def test_spend_follows_the_contract_scopes_and_utc_periods() -> None:
    just_before_november = datetime(2026, 11, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    stored = stored_events(
        {},
        [
            event("a", "0.1", user="u1"),
            event("b", "0.2", deployment=None),
            event("c", "0.4", at=just_before_november),  # 2026-10-31 23:30 in UTC
        ],
    )
    spend = spend_from_usage(stored.usage)
    assert spend == {
        ("t1", "tenant", "t1", "daily", date(2026, 11, 14)): Decimal("0.3"),
        ("t1", "tenant", "t1", "monthly", NOV_1): Decimal("0.3"),
        ("t1", "deployment", "d1", "daily", date(2026, 11, 14)): Decimal("0.1"),
        ("t1", "deployment", "d1", "monthly", NOV_1): Decimal("0.1"),
        ("t1", "user", "u1", "daily", date(2026, 11, 14)): Decimal("0.1"),
        ("t1", "user", "u1", "monthly", NOV_1): Decimal("0.1"),
        ("t1", "tenant", "t1", "daily", date(2026, 10, 31)): Decimal("0.4"),
        ("t1", "tenant", "t1", "monthly", OCT_1): Decimal("0.4"),
        ("t1", "deployment", "d1", "daily", date(2026, 10, 31)): Decimal("0.4"),
        ("t1", "deployment", "d1", "monthly", OCT_1): Decimal("0.4"),
    }


def test_spend_sums_are_exact_beyond_the_default_28_digits() -> None:
    largest = "999999999999.999999999999999999"  # 30 digits, as the contract allows
    stored = stored_events({}, [event("a", largest), event("b", "0.000000000000000001")])
    spend = spend_from_usage(stored.usage)
    assert spend[("t1", "tenant", "t1", "monthly", NOV_1)] == Decimal("1000000000000")


COUNTERS: dict[SpendKey, Decimal] = {
    ("t1", "tenant", "t1", "monthly", NOV_1): Decimal("0.3"),
    ("t1", "tenant", "t1", "daily", date(2026, 11, 14)): Decimal("0.3"),
}


def test_counters_equal_to_the_sums_pass() -> None:
    assert compare_counters(COUNTERS, dict(COUNTERS)).ok


@pytest.mark.parametrize(
    "counters",
    [
        pytest.param(
            {**COUNTERS, ("t1", "tenant", "t1", "monthly", NOV_1): Decimal("0.300000000000000001")},
            id="a counter off by 1e-18",
        ),
        pytest.param(dict(list(COUNTERS.items())[:1]), id="a sum without its counter"),
        pytest.param(
            {**COUNTERS, ("t1", "user", "u9", "daily", NOV_1): Decimal(0)},
            id="a counter without events",
        ),
    ],
)
def test_a_counter_that_is_not_its_exact_sum_fails(counters: dict[SpendKey, Decimal]) -> None:
    row = compare_counters(COUNTERS, counters)
    assert not row.ok
    assert "1 differ" in row.found


# --- 5. Alerts ---

SCOPE = ("t1", "tenant", "t1")
SET_NOV = NOV - timedelta(hours=1)
SET_OCT = datetime(2026, 10, 20, tzinfo=UTC)


def policy(monthly: str, *, daily: str | None = None, pct: int = 80) -> BudgetPolicy:
    return BudgetPolicy(
        tenant_id="t1",
        scope_type=ScopeType.TENANT,
        scope_id="t1",
        daily_limit_usd=Decimal(daily) if daily else None,
        monthly_limit_usd=Decimal(monthly),
        warn_threshold_pct=pct,
    )


def alert_id(limit: str, level: AlertLevel, start: date = NOV_1) -> str:
    return alert_id_for(
        tenant_id="t1",
        scope_type=ScopeType.TENANT,
        scope_id="t1",
        window=BudgetWindow.MONTHLY,
        period_start=start,
        level=level,
        limit_usd=Decimal(limit),
    )


def alert(
    limit: str,
    level: AlertLevel,
    *,
    spend: str = "9",
    start: date = NOV_1,
    pct: int | None = None,
    triggered_by: str | None = "n1",
) -> BudgetAlert:
    return BudgetAlert(
        alert_id=alert_id(limit, level, start),
        tenant_id="t1",
        scope_type=ScopeType.TENANT,
        scope_id="t1",
        window=BudgetWindow.MONTHLY,
        period_start=start,
        level=level,
        spend_usd=Decimal(spend),
        limit_usd=Decimal(limit),
        threshold_pct=pct if pct is not None else 80 if level is AlertLevel.WARNING else 100,
        triggered_by=triggered_by,
        emitted_at=NOV,
    )


# October spent 9 before any policy; November 9 under a limit of 10 set in November, after an
# unreachable 1000 set in October.
SPEND: dict[SpendKey, Decimal] = {
    ("t1", "tenant", "t1", "monthly", OCT_1): Decimal("9"),
    ("t1", "tenant", "t1", "monthly", NOV_1): Decimal("9"),
}
HISTORY = {SCOPE: [PolicyVersion(policy("1000"), SET_OCT), PolicyVersion(policy("10"), SET_NOV)]}
TRIGGERING = {"n1": event("n1", "5", tenant="t1")}


def test_only_the_policy_in_effect_expects_alerts_from_the_period_it_was_set_in() -> None:
    expected, refused = expected_alerts(SPEND, HISTORY)
    assert set(expected) == {alert_id("10", AlertLevel.WARNING)}  # 9 >= 8, 9 < 10
    assert expected[alert_id("10", AlertLevel.WARNING)].threshold_pct == 80
    assert "below 10" in refused[alert_id("10", AlertLevel.EXCEEDED)]
    assert "before the policy was set" in refused[alert_id("10", AlertLevel.WARNING, OCT_1)]
    assert "superseded" in refused[alert_id("1000", AlertLevel.WARNING)]


def test_the_thresholds_are_exact_decimal_comparisons() -> None:
    at_warning = {("t1", "tenant", "t1", "monthly", NOV_1): Decimal("7.999999999999999999")}
    history = {SCOPE: [PolicyVersion(policy("10"), SET_NOV)]}
    assert expected_alerts(at_warning, history)[0] == {}
    at_limit = {("t1", "tenant", "t1", "monthly", NOV_1): Decimal("10.000")}
    assert set(expected_alerts(at_limit, history)[0]) == {
        alert_id("10", AlertLevel.WARNING),
        alert_id("10", AlertLevel.EXCEEDED),
    }


def test_a_deleted_policy_expects_nothing() -> None:
    history = {SCOPE: [PolicyVersion(policy("10"), SET_NOV), PolicyVersion(None, NOV)]}
    expected, refused = expected_alerts(SPEND, history)
    assert expected == {}
    assert refused[alert_id("10", AlertLevel.WARNING)] == "policy deleted"


def test_policy_history_places_each_change_on_the_simulated_clock() -> None:
    clock = SimulatedClock(
        start=datetime(2026, 10, 31, 23, 30, tzinfo=UTC), real_start=1000.0, rate=60
    )
    changed_at = datetime.fromtimestamp(1040.0, tz=UTC)  # 40 real seconds: 40 simulated minutes
    history = policy_history(
        [
            (SCOPE, json.dumps(policy("10").to_json()), changed_at),
            (SCOPE, None, changed_at),
        ],
        clock,
    )
    assert history[SCOPE] == [
        PolicyVersion(policy("10"), datetime(2026, 11, 1, 0, 10, tzinfo=UTC)),
        PolicyVersion(None, datetime(2026, 11, 1, 0, 10, tzinfo=UTC)),
    ]


def check(*alerts: BudgetAlert | bytes) -> tuple[bool, str]:
    expected, refused = expected_alerts(SPEND, HISTORY)
    values = [a if isinstance(a, bytes) else a.encode() for a in alerts]
    row = compare_alerts(
        expected, refused, decode_alerts(values), counters=SPEND, triggering=TRIGGERING
    )
    return row.ok, row.detail


def test_the_expected_alerts_each_once_pass() -> None:
    assert check(alert("10", AlertLevel.WARNING)) == (True, "")
    assert check(alert("10", AlertLevel.WARNING, triggered_by=None))[0]  # a policy change


@pytest.mark.parametrize(
    ("alerts", "detail"),
    [
        pytest.param((), "missing", id="a missing alert"),
        pytest.param(
            (alert("10", AlertLevel.WARNING), alert("10", AlertLevel.WARNING)),
            "2 times",
            id="a duplicate alert",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING), alert("1000", AlertLevel.WARNING, spend="800")),
            "superseded limit",
            id="an alert for a superseded limit",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING), alert("10", AlertLevel.WARNING, start=OCT_1)),
            "before the policy was set",
            id="an alert for a period before the policy was set",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING), alert("10", AlertLevel.EXCEEDED)),
            "below 10",
            id="an alert the spend never reached",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING, pct=70),), "threshold_pct 70", id="other pct"
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING, spend="7.99"),),
            "below its threshold",
            id="spend below the threshold",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING, spend="9.01"),),
            "above its counter",
            id="spend above what the counter ever reached",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING, triggered_by="nobody"),),
            "triggered_by nobody",
            id="triggered by an unknown event",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING).model_copy(update={"alert_id": "made-up"}),),
            "fields make the id",
            id="an id that is not its key's",
        ),
        pytest.param(
            (alert("10", AlertLevel.WARNING), b'{"alert_id": "x"}'), "not an alert v1", id="junk"
        ),
    ],
)
def test_a_missing_doubled_unexpected_or_wrong_alert_fails(
    alerts: tuple[BudgetAlert | bytes, ...], detail: str
) -> None:
    ok, found = check(*alerts)
    assert not ok
    assert detail in found


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(event("n1", "5", tenant="t2"), id="another tenant's event"),
        pytest.param(event("n1", "5", at=datetime(2026, 10, 31, tzinfo=UTC)), id="another period"),
    ],
)
def test_an_alert_triggered_by_an_event_its_counter_does_not_count_fails(
    trigger: SentEvent,
) -> None:
    expected, refused = expected_alerts(SPEND, HISTORY)
    decoded = decode_alerts([alert("10", AlertLevel.WARNING).encode()])
    row = compare_alerts(expected, refused, decoded, counters=SPEND, triggering={"n1": trigger})
    assert not row.ok
    assert "triggered_by n1" in row.detail


def test_a_deployment_alert_is_triggered_only_by_that_deployment_s_events() -> None:
    counters: dict[SpendKey, Decimal] = {("t1", "deployment", "d1", "monthly", NOV_1): Decimal(9)}
    limit = BudgetPolicy(
        tenant_id="t1",
        scope_type=ScopeType.DEPLOYMENT,
        scope_id="d1",
        monthly_limit_usd=Decimal(10),
    )
    expected, refused = expected_alerts(counters, {limit.key: [PolicyVersion(limit, SET_NOV)]})
    [expected_id] = expected
    warning = alert("10", AlertLevel.WARNING).model_copy(
        update={"alert_id": expected_id, "scope_type": ScopeType.DEPLOYMENT, "scope_id": "d1"}
    )
    decoded = decode_alerts([warning.encode()])
    for trigger, ok in ((event("n1", "5"), True), (event("n1", "5", deployment="d2"), False)):
        row = compare_alerts(
            expected, refused, decoded, counters=counters, triggering={"n1": trigger}
        )
        assert row.ok is ok, row


# --- 6. Invoices ---

CLOSED = {"2026-10"}
OCT = datetime(2026, 10, 20, tzinfo=UTC)


def line(cents: int, *, kind: str = "llm_usage", period: str = "2026-10") -> BilledLine:
    return BilledLine("t1", "d1", period, kind, "2026-10", cents)


def test_a_closed_month_billed_by_its_line_and_adjustments_to_the_cent_passes() -> None:
    # 0.005 + 0.005 is one cent only when summed exactly; 0.004 alone (no deployment) rounds to 0.
    events = [
        event("a", "0.005", at=OCT),
        event("b", "0.005", at=OCT),
        event("c", "0.004", deployment=None, at=OCT),
        event("d", "0.016", at=OCT),  # late: billed in November by an adjustment
        event("e", "7", at=NOV),  # November is open: not checked
    ]
    expected = invoice_totals(stored_events({}, events).usage, CLOSED)
    assert expected == {("t1", "d1", "2026-10"): 3, ("t1", None, "2026-10"): 0}
    lines = [
        line(1),
        line(2, kind="llm_usage_adjustment", period="2026-11"),
        BilledLine("t1", "d1", "2026-11", "llm_usage", "2026-11", 700),
    ]
    billed = billed_cents(lines, CLOSED)
    assert billed == {("t1", "d1", "2026-10"): 3}
    row = compare_invoices(expected, billed, closed=CLOSED, adjustment_lines=1)
    assert row.ok, row
    assert "1 closed (2026-10), 2 groups, 0 differ, 1 adjustment lines" in row.found


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([line(1)], id="lines one cent short"),
        pytest.param([line(3), line(1, kind="llm_usage_adjustment", period="2026-11")], id="over"),
        pytest.param([], id="no line"),
    ],
)
def test_a_closed_month_whose_lines_are_a_cent_off_fails(lines: list[BilledLine]) -> None:
    expected: dict[InvoiceKey, int] = {("t1", "d1", "2026-10"): 3}
    row = compare_invoices(expected, billed_cents(lines, CLOSED), closed=CLOSED, adjustment_lines=0)
    assert not row.ok
    assert "2026-10 t1/d1" in row.detail


def test_lines_for_a_group_without_events_fail() -> None:
    row = compare_invoices({}, billed_cents([line(1)], CLOSED), closed=CLOSED, adjustment_lines=0)
    assert not row.ok


def test_a_run_that_closed_no_month_fails() -> None:
    row = compare_invoices({}, {}, closed=set(), adjustment_lines=0)
    assert not row.ok
    assert "no month was closed" in row.detail


# --- 7. Counts, and an unreadable topic ---


def test_counts_are_information_unless_they_contradict_themselves() -> None:
    sent = Counter(event=8, duplicate=3, transactional_committed=2, malformed=4)
    row = compare_counts(sent, events=10, rows=10)
    assert row.ok
    assert "duplicate 3" in row.found
    assert not compare_counts(sent, events=10, rows=14).ok  # malformed records never store
    assert not compare_counts(Counter(), events=1, rows=0).ok


def test_a_topic_that_could_not_be_read_fails_its_check() -> None:
    row = unreadable(compare_dead_letters({}, []), "alerts could not be read: timeout")
    assert not row.ok
    assert row.detail == "alerts could not be read: timeout"
