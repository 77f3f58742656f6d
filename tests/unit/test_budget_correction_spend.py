"""What a corrected event is worth to the budget counters, and the moves a correction makes
(consumers/budget/counting.py): pure, exact, nothing before the budget horizon."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.consumers.budget.counting import correction_moves, spend_contribution
from llm_usage.domain.budgets import SpendKey
from llm_usage.domain.corrections import Action, Correction, Effective, effective_after, winner
from llm_usage.storage.budget_spend import ChargeMove

AT = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)  # the last second of a month
DAY, MONTH = date(2026, 11, 30), date(2026, 11, 1)
HORIZON = date(2026, 10, 1)
EVENT = Effective(
    deployment_id="dep-1",
    user_id="u-1",
    agent_id=None,
    input_tokens=100,
    output_tokens=50,
    cached_input_tokens=0,
    reasoning_tokens=0,
    total_tokens=150,
    customer_charge_usd=Decimal("0.42"),
    customer_charge_cents=42,
    charge_estimated=False,
)


def test_an_event_adds_its_charge_to_each_named_scope_in_its_utc_day_and_month() -> None:
    assert spend_contribution("t1", AT, EVENT, horizon=HORIZON) == {
        ("t1", scope, scope_id, window, start): Decimal("0.42")
        for scope, scope_id in (("tenant", "t1"), ("deployment", "dep-1"), ("user", "u-1"))
        for window, start in (("daily", DAY), ("monthly", MONTH))
    }


def test_an_offset_time_counts_in_its_utc_day() -> None:
    moment = datetime(2026, 12, 1, 0, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    keys = spend_contribution("t1", moment, EVENT, horizon=HORIZON)
    assert {key[4] for key in keys} == {date(2026, 12, 1)}


@pytest.mark.parametrize(
    ("event", "horizon"),
    [
        (replace(EVENT, voided=True), HORIZON),
        (EVENT, DAY + timedelta(days=1)),  # the day is before the horizon: no period counts it
    ],
)
def test_a_voided_event_or_a_day_before_the_horizon_adds_nothing(
    event: Effective, horizon: date
) -> None:
    assert spend_contribution("t1", AT, event, horizon=horizon) == {}


def test_the_horizon_day_itself_still_counts() -> None:
    assert spend_contribution("t1", AT, EVENT, horizon=DAY)


def spend_delta(
    old: dict[SpendKey, Decimal], new: dict[SpendKey, Decimal]
) -> dict[SpendKey, Decimal]:
    """`new` minus `old` per counter; counters that do not move are left out."""
    moved = {key: new.get(key, Decimal(0)) - old.get(key, Decimal(0)) for key in old | new}
    return {key: amount for key, amount in moved.items() if amount}


def counters_moved(moves: list[ChargeMove], horizon: date = HORIZON) -> dict[SpendKey, Decimal]:
    """What the moves add to each counter, expanded by the rule the counters' SQL follows."""
    total: dict[SpendKey, Decimal] = {}
    for move in moves:
        as_event = replace(
            EVENT,
            deployment_id=move.deployment_id,
            user_id=move.user_id,
            agent_id=move.agent_id,
            customer_charge_usd=move.customer_charge_usd,
        )
        for key, amount in spend_contribution(
            move.tenant_id, move.occurred_at, as_event, horizon=horizon
        ).items():
            total[key] = total.get(key, Decimal(0)) + amount
    return {key: amount for key, amount in total.items() if amount}


def moves_of(before: Effective, after: Effective) -> list[ChargeMove]:
    return correction_moves("req-1", "t1", AT, before, after)


def test_the_move_is_the_exact_difference_and_leaves_out_what_does_not_move() -> None:
    before = spend_contribution("t1", AT, EVENT, horizon=HORIZON)
    moved = replace(EVENT, user_id="u-2", customer_charge_usd=Decimal("0.000000000000000001"))
    after = spend_contribution("t1", AT, moved, horizon=HORIZON)
    delta = counters_moved(moves_of(EVENT, moved))
    down, up = Decimal("-0.42"), Decimal("0.000000000000000001")
    change = Decimal("-0.419999999999999999")
    assert delta == {
        **{("t1", "user", "u-1", w, s): down for w, s in (("daily", DAY), ("monthly", MONTH))},
        **{("t1", "user", "u-2", w, s): up for w, s in (("daily", DAY), ("monthly", MONTH))},
        **{
            ("t1", scope, scope_id, w, s): change
            for scope, scope_id in (("tenant", "t1"), ("deployment", "dep-1"))
            for w, s in (("daily", DAY), ("monthly", MONTH))
        },
    }
    assert delta == spend_delta(before, after)
    assert moves_of(EVENT, EVENT) == []


def test_a_changed_charge_under_the_same_attribution_is_one_move_of_the_difference() -> None:
    halved = replace(EVENT, customer_charge_usd=Decimal("0.21"), input_tokens=1)
    assert moves_of(EVENT, halved) == [
        ChargeMove("req-1", "t1", "dep-1", "u-1", None, AT, Decimal("-0.21"))
    ]
    # Tokens alone move no counter.
    assert moves_of(EVENT, replace(EVENT, input_tokens=1, total_tokens=51)) == []


def test_an_event_without_a_charge_moves_no_counter_whatever_the_correction() -> None:
    free = replace(EVENT, customer_charge_usd=Decimal(0), customer_charge_cents=0)
    assert moves_of(free, replace(free, voided=True)) == []
    assert moves_of(free, replace(free, user_id="u-2")) == []
    assert moves_of(replace(free, voided=True), free) == []


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (EVENT, replace(EVENT, voided=True), [Decimal("-0.42")]),
        (replace(EVENT, voided=True), EVENT, [Decimal("0.42")]),
        (replace(EVENT, voided=True), replace(EVENT, voided=True), []),
        (EVENT, replace(EVENT, agent_id="a-1"), [Decimal("-0.42"), Decimal("0.42")]),
    ],
)
def test_a_void_takes_the_charge_back_and_a_revival_or_a_move_of_scope_adds_it(
    before: Effective, after: Effective, expected: list[Decimal]
) -> None:
    moves = moves_of(before, after)
    assert [move.customer_charge_usd for move in moves] == expected
    assert counters_moved(moves) == spend_delta(
        spend_contribution("t1", AT, before, horizon=HORIZON),
        spend_contribution("t1", AT, after, horizon=HORIZON),
    )


_charges = st.decimals(min_value=0, max_value=Decimal("1000"), places=6)
_ids = st.sampled_from(["dep-1", "dep-2", None])


@st.composite
def corrections(draw: st.DrawFn) -> list[Correction]:
    found = []
    for n in range(draw(st.integers(min_value=1, max_value=4))):
        action = draw(st.sampled_from(Action))
        fields: dict[str, object] = {}
        if action is Action.AMEND:
            fields = {
                "customer_charge_usd": draw(_charges),
                "deployment_id": draw(_ids),
                "user_id": draw(st.sampled_from(["u-1", "u-2", None])),
            }
        found.append(
            Correction(
                tenant_id="t1",
                correction_id=f"c-{n}",
                gateway_request_id="req-1",
                action=action,
                fields=fields,
                reason="test",
                actor="ops",
                occurred_at=AT + timedelta(minutes=draw(st.integers(0, 3))),
            )
        )
    return found


def _add(total: dict[SpendKey, Decimal], move: dict[SpendKey, Decimal]) -> None:
    for key, amount in move.items():
        total[key] = total.get(key, Decimal(0)) + amount
        if not total[key]:
            del total[key]


@settings(max_examples=60)
@given(corrections(), st.data())
def test_moves_in_any_order_end_in_the_winners_contribution(
    applied: list[Correction], data: st.DataObject
) -> None:
    """Applied one at a time (old = the winner of those applied so far), in any order, the moves
    sum to the contribution of the winner of all: the order-independence the budget consumer's
    counters rely on."""
    order = data.draw(st.permutations(applied))
    counters = spend_contribution("t1", AT, EVENT, horizon=HORIZON)  # the event, counted
    so_far: list[Correction] = []
    for correction in order:
        before = effective_after(EVENT, winner(so_far))
        so_far.append(correction)
        after = effective_after(EVENT, winner(so_far))
        _add(counters, counters_moved(moves_of(before, after)))
        assert all(amount >= 0 for amount in counters.values())  # never below zero
    final = effective_after(EVENT, winner(applied))
    expected = {k: v for k, v in spend_contribution("t1", AT, final, horizon=HORIZON).items() if v}
    assert counters == expected
