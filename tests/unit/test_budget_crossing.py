"""Threshold crossing and counter contributions: exact boundaries, both levels at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_usage.consumers.budget.counting import contributions_to
from llm_usage.consumers.budget.crossing import (
    Contribution,
    Crossing,
    crossings_at_rest,
    crossings_by_events,
)
from llm_usage.domain.budgets import AlertLevel, CounterKey, ScopeType, SpendKey, scopes_of
from llm_usage.schemas.usage_event import UsageEvent

D = Decimal
WARNING, EXCEEDED = AlertLevel.WARNING, AlertLevel.EXCEEDED


def events(*amounts: str) -> list[Contribution]:
    return [Contribution(f"r{i}", D(amount)) for i, amount in enumerate(amounts, 1)]


@pytest.mark.parametrize(
    ("before", "amounts", "expected"),
    [
        pytest.param("0", ["79.99"], [], id="just below the warning"),
        pytest.param("0", ["80"], [(WARNING, "80", "r1")], id="exactly at the warning"),
        pytest.param("79.99", ["0.01"], [(WARNING, "80.00", "r1")], id="reached by a cent"),
        pytest.param(
            "0", ["100"], [(WARNING, "100", "r1"), (EXCEEDED, "100", "r1")], id="both by one"
        ),
        pytest.param(
            "50",
            ["20", "15", "20"],
            [(WARNING, "85", "r2"), (EXCEEDED, "105", "r3")],
            id="each by its own event",
        ),
        pytest.param("80", ["5"], [], id="warning reached before the batch"),
        pytest.param("80", ["20"], [(EXCEEDED, "100", "r1")], id="only exceeded is left"),
        pytest.param("100", ["1"], [], id="both reached before"),
        pytest.param("0", ["0", "0"], [], id="free requests cross nothing"),
        pytest.param(
            "79.999999999999999999",
            ["0.000000000000000001"],
            [(WARNING, "80.000000000000000000", "r1")],
            id="exact at 18 decimal places",
        ),
    ],
)
def test_crossings_by_events(
    before: str, amounts: list[str], expected: list[tuple[AlertLevel, str, str]]
) -> None:
    found = crossings_by_events(
        D(before), events(*amounts), limit_usd=D("100"), warn_threshold_pct=80
    )
    assert found == [Crossing(level, D(spend), by) for level, spend, by in expected]


def test_a_threshold_that_is_not_a_round_number_is_compared_exactly() -> None:
    # 33 % of 0.03 is 0.0099: a float would say 0.009899999...
    assert crossings_by_events(
        D("0"), events("0.0099"), limit_usd=D("0.03"), warn_threshold_pct=33
    ) == [Crossing(WARNING, D("0.0099"), "r1")]
    assert (
        crossings_by_events(D("0"), events("0.0098"), limit_usd=D("0.03"), warn_threshold_pct=33)
        == []
    )


@pytest.mark.parametrize(
    ("spend", "limit", "levels"),
    [
        ("50", "100", []),
        ("80", "100", [WARNING]),
        ("99.99", "100", [WARNING]),
        ("100", "100", [WARNING, EXCEEDED]),
        ("150", "40", [WARNING, EXCEEDED]),  # a limit lowered far below the spend
        ("0", "100", []),
    ],
)
def test_crossings_at_rest_for_a_policy_set_below_the_spend(
    spend: str, limit: str, levels: list[AlertLevel]
) -> None:
    found = crossings_at_rest(D(spend), limit_usd=D(limit), warn_threshold_pct=80)
    assert [c.level for c in found] == levels
    assert all(c.triggered_by is None and c.spend_usd == D(spend) for c in found)


def usage(**fields: object) -> UsageEvent:
    base: dict[str, object] = {
        "gateway_request_id": "r1",
        "tenant_id": "t1",
        "customer_charge_usd": "0.5",
        "occurred_at": "2026-11-30T23:30:00-01:00",
    }
    base.update(fields)
    return UsageEvent.model_validate(base, context={"now": datetime(2026, 12, 2, tzinfo=UTC)})


def counters_of(event: UsageEvent) -> list[SpendKey]:
    """Every counter an event adds to, spelled out: each scope it names, in its UTC day and
    month."""
    day = event.occurred_at.astimezone(UTC).date()
    return [
        (event.tenant_id, scope_type, scope_id, window, start)
        for scope_type, scope_id in scopes_of(event)
        for window, start in (("daily", day), ("monthly", day.replace(day=1)))
    ]


def test_an_event_counts_toward_every_scope_it_names_and_its_own_utc_periods() -> None:
    event = usage(deployment_id="dep-7", agent_id="agent-1")
    assert scopes_of(event) == [
        (ScopeType.TENANT, "t1"),
        (ScopeType.DEPLOYMENT, "dep-7"),
        (ScopeType.AGENT, "agent-1"),
    ]
    # 23:30 at -01:00 is 00:30 UTC on 1 December: December's day and month, not November's.
    assert sorted(counters_of(event)) == sorted(
        ("t1", scope_type, scope_id, window, date(2026, 12, 1))
        for scope_type, scope_id in (
            ("tenant", "t1"),
            ("deployment", "dep-7"),
            ("agent", "agent-1"),
        )
        for window in ("daily", "monthly")
    )
    counters = contributions_to(counters_of(event), [event])
    assert sorted(counters) == sorted(counters_of(event))
    assert all(c == [Contribution("r1", D("0.5"))] for c in counters.values())


def test_contributions_keep_the_events_order_per_counter() -> None:
    first = usage(gateway_request_id="a", customer_charge_usd="1")
    second = usage(gateway_request_id="b", customer_charge_usd="2", user_id="u")
    tenant_month = ("t1", "tenant", "t1", "monthly", date(2026, 12, 1))
    user_day = ("t1", "user", "u", "daily", date(2026, 12, 1))
    counters = contributions_to([tenant_month, user_day], [first, second])
    assert counters == {
        tenant_month: [Contribution("a", D("1")), Contribution("b", D("2"))],
        user_day: [Contribution("b", D("2"))],
    }


_ONE_USD = D("1")


@dataclass(frozen=True)
class _Counted:
    """A counted event as another caller could hand it: its time in its own offset."""

    gateway_request_id: str
    occurred_at: datetime
    tenant_id: str = "t1"
    deployment_id: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    customer_charge_usd: Decimal = _ONE_USD


def test_an_event_in_another_offset_counts_toward_its_utc_day_and_month() -> None:
    minus_one = timezone(timedelta(hours=-1))
    late = _Counted("late", datetime(2026, 11, 30, 23, 30, tzinfo=minus_one))  # 00:30 UTC, Dec 1
    early = _Counted("early", datetime(2026, 11, 30, 22, 59, tzinfo=minus_one))  # 23:59 UTC
    december = ("t1", "tenant", "t1", "monthly", date(2026, 12, 1))
    november = ("t1", "tenant", "t1", "monthly", date(2026, 11, 1))
    last_day = ("t1", "tenant", "t1", "daily", date(2026, 11, 30))
    counters = contributions_to([december, november, last_day], [late, early])
    assert counters == {
        december: [Contribution("late", D("1"))],
        november: [Contribution("early", D("1"))],
        last_day: [Contribution("early", D("1"))],
    }


_EVENTS = st.lists(
    st.builds(
        lambda n, tenant, deployment, user, agent, day, hour, offset: usage(
            gateway_request_id=f"r{n}",
            tenant_id=tenant,
            deployment_id=deployment,
            user_id=user,
            agent_id=agent,
            customer_charge_usd=str(n),
            occurred_at=f"2026-{day}T{hour:02d}:30:00{offset}",
        ),
        st.integers(0, 10**6),
        st.sampled_from(["t1", "t2"]),
        st.sampled_from([None, "d1", "d2"]),
        st.sampled_from([None, "u1"]),
        st.sampled_from([None, "a1", "t1"]),  # an agent named like a tenant is still an agent
        st.sampled_from(["10-31", "11-01", "11-30"]),  # offsets carry some across
        st.integers(0, 23),
        st.sampled_from(["Z", "+01:00", "-01:00"]),
    ),
    max_size=12,
)


@given(events=_EVENTS, data=st.data())
def test_contributions_to_some_counters_are_those_of_every_counter_restricted_to_them(
    events: list[UsageEvent], data: st.DataObject
) -> None:
    everything: dict[SpendKey, list[Contribution]] = {}
    for event in events:
        for key in counters_of(event):
            everything.setdefault(key, []).append(
                Contribution(event.gateway_request_id, event.customer_charge_usd)
            )
    asked = data.draw(
        st.lists(
            st.sampled_from([*everything, ("t1", "deployment", "d9", "daily", date(2026, 11, 1))]),
            unique=True,
        )
        if everything
        else st.just([])
    )
    assert contributions_to(asked, events) == {key: everything.get(key, []) for key in asked}


def test_a_spend_key_is_the_counter_key_in_lock_order() -> None:
    keys = [
        ("t1", "user", "u", "daily", date(2026, 12, 1)),
        ("t1", "deployment", "d", "monthly", date(2026, 12, 1)),
        ("t0", "tenant", "t0", "daily", date(2026, 12, 2)),
    ]
    typed = [CounterKey.from_spend_key(key) for key in keys]
    assert [key.sort_key() for key in typed] == keys
    assert sorted(typed) == [CounterKey.from_spend_key(key) for key in sorted(keys)]
