"""The budget consumer's alert decisions (consumers/budget/alerts.py): the alerts a batch
crosses, and the alerts the policy watcher finds reached at rest."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from llm_usage.consumers.budget.alerts import alerts_at_rest, alerts_crossed, crossings_at_rest_of
from llm_usage.consumers.budget.crossing import Contribution
from llm_usage.domain.budgets import AlertLevel, CounterKey, SpendKey
from llm_usage.storage.budget_spend import LimitedCounter
from llm_usage.storage.budget_status import PolicyWindow

D = Decimal
MONTH = date(2026, 12, 1)
NOW = datetime(2026, 12, 2, tzinfo=UTC)
TENANT_MONTH: SpendKey = ("t1", "tenant", "t1", "monthly", MONTH)
TENANT_DAY: SpendKey = ("t1", "tenant", "t1", "daily", date(2026, 12, 2))
USER_MONTH: SpendKey = ("t1", "user", "u1", "monthly", MONTH)


def test_alerts_are_crossed_by_the_first_event_reaching_each_level_of_a_counter_with_a_policy() -> (
    None
):
    contributions = {
        TENANT_MONTH: [
            Contribution("a", D("0.05")),
            Contribution("b", D("0.05")),
            Contribution("c", D("2.5")),
        ],
        TENANT_DAY: [Contribution("a", D("0.05"))],  # the policy has no daily limit
        USER_MONTH: [Contribution("a", D("100"))],  # no policy for this user
    }
    # Only counters whose scope has a policy with a limit for their window come back from the
    # database: here the tenant's monthly counter, not its daily one, nor the user's.
    limited = {TENANT_MONTH: LimitedCounter(D("7.9"), D("10.5"), D(10), 80)}
    alerts = alerts_crossed(contributions, limited, emitted_at=NOW)
    assert [(a.level, a.spend_usd, a.triggered_by, a.window.value) for a in alerts] == [
        (AlertLevel.WARNING, D("8.00"), "b", "monthly"),
        (AlertLevel.EXCEEDED, D("10.50"), "c", "monthly"),
    ]
    assert all(a.period_start == MONTH and a.limit_usd == 10 for a in alerts)


def test_a_counter_already_past_a_level_before_the_batch_does_not_cross_it_again() -> None:
    contributions = {TENANT_MONTH: [Contribution("z", D("1"))]}
    limited = {TENANT_MONTH: LimitedCounter(D("8.5"), D("9.5"), D(10), 80)}
    assert alerts_crossed(contributions, limited, emitted_at=NOW) == []
    past_the_limit = {TENANT_MONTH: LimitedCounter(D("10"), D("11"), D(10), 80)}
    assert alerts_crossed(contributions, past_the_limit, emitted_at=NOW) == []


def test_both_levels_fall_to_one_event_and_an_exact_boundary_counts_as_reached() -> None:
    contributions = {TENANT_MONTH: [Contribution("y", D("0.5")), Contribution("z", D("2"))]}
    limited = {TENANT_MONTH: LimitedCounter(D("7.5"), D("10"), D(10), 80)}
    alerts = alerts_crossed(contributions, limited, emitted_at=NOW)
    assert [(a.level, a.spend_usd, a.triggered_by) for a in alerts] == [
        (AlertLevel.WARNING, D("8.0"), "y"),
        (AlertLevel.EXCEEDED, D("10.0"), "z"),
    ]


def test_a_counter_below_the_warning_after_the_batch_crosses_nothing() -> None:
    contributions = {TENANT_MONTH: [Contribution("z", D("0.01"))]}
    limited = {TENANT_MONTH: LimitedCounter(D("7.98"), D("7.99"), D(10), 80)}
    assert alerts_crossed(contributions, limited, emitted_at=NOW) == []


def test_a_level_an_event_reaches_alerts_though_a_correction_later_in_the_batch_takes_it_back() -> (
    None
):
    # Events first, then the corrections: the counter ends below the warning, but went past
    # the limit on the way (its peak: before + the positive charges).
    contributions = {
        TENANT_MONTH: [Contribution("e", D("3.5")), Contribution("c", D("-3"))],
    }
    back_down = LimitedCounter(D("7"), D("7.5"), D(10), 80, peak_usd=D("10.5"))
    alerts = alerts_crossed(contributions, {TENANT_MONTH: back_down}, emitted_at=NOW)
    assert [(a.level, a.spend_usd, a.triggered_by) for a in alerts] == [
        (AlertLevel.WARNING, D("10.5"), "e"),
        (AlertLevel.EXCEEDED, D("10.5"), "e"),
    ]
    # Without its peak the same counter would look as if it crossed nothing.
    assert (
        alerts_crossed(
            contributions, {TENANT_MONTH: back_down._replace(peak_usd=None)}, emitted_at=NOW
        )
        == []
    )


def test_the_watcher_builds_alerts_only_for_levels_reached_at_rest_that_never_alerted() -> None:
    counter = CounterKey.from_spend_key(TENANT_MONTH)
    windows = [
        PolicyWindow(counter, limit_usd=D(10), warn_threshold_pct=80, spend_usd=D("12")),
        PolicyWindow(
            CounterKey.from_spend_key(USER_MONTH),
            limit_usd=D(10),
            warn_threshold_pct=80,
            spend_usd=D("7.99"),
        ),
    ]
    reached = crossings_at_rest_of(windows)
    assert [(window.counter, crossing.level) for window, crossing in reached] == [
        (counter, AlertLevel.WARNING),
        (counter, AlertLevel.EXCEEDED),
    ]
    known = {counter.alert_id(AlertLevel.WARNING, D("10.00"))}  # the same limit, spelt otherwise
    alerts = alerts_at_rest(reached, now=NOW, known_ids=known)
    assert [(a.level, a.spend_usd, a.triggered_by) for a in alerts] == [
        (AlertLevel.EXCEEDED, D("12"), None)
    ]
    assert alerts[0].alert_id == counter.alert_id(AlertLevel.EXCEEDED, D(10))
