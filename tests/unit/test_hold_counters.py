"""Which counters a budget check holds on: the same scopes an event counts toward
(domain/budgets.py `scopes_of`), daily and monthly, in lock order."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from llm_usage.domain.budgets import CounterKey, scopes_of
from llm_usage.domain.holds import hold_counters

_attribution = st.one_of(st.none(), st.text(min_size=1, max_size=6))


def test_a_check_with_every_attribution_holds_on_eight_counters_in_lock_order() -> None:
    counters = hold_counters("t", "d", "u", "a", date(2027, 2, 14))
    assert counters == [
        ("t", "agent", "a", "daily", date(2027, 2, 14)),
        ("t", "agent", "a", "monthly", date(2027, 2, 1)),
        ("t", "deployment", "d", "daily", date(2027, 2, 14)),
        ("t", "deployment", "d", "monthly", date(2027, 2, 1)),
        ("t", "tenant", "t", "daily", date(2027, 2, 14)),
        ("t", "tenant", "t", "monthly", date(2027, 2, 1)),
        ("t", "user", "u", "daily", date(2027, 2, 14)),
        ("t", "user", "u", "monthly", date(2027, 2, 1)),
    ]


def test_attributions_not_sent_hold_nothing() -> None:
    assert hold_counters("t", None, "u", None, date(2027, 3, 1)) == [
        ("t", "tenant", "t", "daily", date(2027, 3, 1)),
        ("t", "tenant", "t", "monthly", date(2027, 3, 1)),
        ("t", "user", "u", "daily", date(2027, 3, 1)),
        ("t", "user", "u", "monthly", date(2027, 3, 1)),
    ]


@given(
    tenant=st.text(min_size=1, max_size=6),
    deployment=_attribution,
    user=_attribution,
    agent=_attribution,
    day=st.dates(date(2000, 1, 1), date(2100, 12, 31)),
)
def test_the_counters_are_the_events_scopes_by_window_sorted_as_counters_lock(
    tenant: str, deployment: str | None, user: str | None, agent: str | None, day: date
) -> None:
    event = SimpleNamespace(
        tenant_id=tenant, deployment_id=deployment, user_id=user, agent_id=agent
    )

    counters = hold_counters(tenant, deployment, user, agent, day)

    assert {(key[1], key[2]) for key in counters} == {
        (scope_type.value, scope_id) for scope_type, scope_id in scopes_of(event)
    }
    assert len(counters) == 2 * len(scopes_of(event))
    assert {(key[3], key[4]) for key in counters} == {
        ("daily", day),
        ("monthly", day.replace(day=1)),
    }
    assert all(key[0] == tenant for key in counters)
    # The order every writer locks in: the same as the spend counters' (CounterKey.sort_key).
    keys = [CounterKey.from_spend_key(key) for key in counters]
    assert counters == [key.sort_key() for key in sorted(keys)]
    assert counters == sorted(counters)
