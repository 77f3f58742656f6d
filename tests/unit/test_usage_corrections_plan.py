"""Planning a batch's corrections (pure): who wins, what the aggregates move by, and that applying
any corrections one at a time, in any order, ends where applying the winner alone does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.consumers.usage.corrections import (
    add_dimensions,
    add_totals,
    dimensions_contribution,
    judge,
    plan_corrections,
    totals_contribution,
)
from llm_usage.domain.corrections import (
    Action,
    Correction,
    Verdict,
    effective_after,
    original,
    winner,
)
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.corrections import EffectiveNow, JudgedCorrection
from tests.records import consumer_record

EVENT_AT = datetime(2026, 11, 14, 9, 0, tzinfo=UTC)
LATER = EVENT_AT + timedelta(days=1)


def row(**fields: Any) -> UsageRow:
    base: dict[str, Any] = {
        "gateway_request_id": "r1",
        "tenant_id": "t1",
        "deployment_id": "dep-1",
        "user_id": "u-1",
        "agent_id": None,
        "channel": "api",
        "feature": None,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "request_kind": None,
        "input_tokens": 100,
        "output_tokens": 20,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 120,
        "upstream_cost_usd": None,
        "customer_charge_usd": Decimal("0.0054"),
        "customer_charge_cents": 1,
        "markup_mode": None,
        "occurred_at": EVENT_AT,
    }
    return UsageRow(**{**base, **fields})


def correction(
    correction_id: str,
    action: Action = Action.AMEND,
    *,
    at: datetime = LATER,
    **fields: object,
) -> Correction:
    return Correction(
        tenant_id="t1",
        correction_id=correction_id,
        gateway_request_id="r1",
        action=action,
        fields=fields,
        reason="test",
        actor="ops",
        occurred_at=at,
        event_occurred_at=EVENT_AT,
    )


EVENT = row()
EVENTS = {("t1", "r1"): EVENT}
KEY = ("t1", EVENT_AT, "r1")


def test_a_void_removes_the_event_from_every_aggregate() -> None:
    plan = plan_corrections([correction("c1", Action.VOID)], EVENTS, {})
    assert plan.won == 1
    assert add_totals(plan.totals, totals_contribution(EVENT, original(EVENT))) == {}
    assert add_dimensions(plan.dimensions, dimensions_contribution(EVENT, original(EVENT))) == {}
    [write] = plan.writes
    assert write.won
    assert write.from_deployment_id == "dep-1"
    assert write.charge_delta_usd == Decimal("-0.0054")
    assert plan.effective[KEY].effective.voided
    assert plan.effective[KEY].corrections == 1


def test_an_amend_moves_the_request_between_deployments() -> None:
    amend = correction("c1", deployment_id="dep-2", customer_charge_usd=Decimal("0.01"))
    plan = plan_corrections([amend], EVENTS, {})
    day = EVENT_AT.date()
    assert plan.totals[("t1", "dep-1", day)].requests == -1
    assert plan.totals[("t1", "dep-1", day)].charge_usd == Decimal("-0.0054")
    assert plan.totals[("t1", "dep-2", day)].requests == 1
    assert plan.totals[("t1", "dep-2", day)].charge_usd == Decimal("0.01")
    [write] = plan.writes
    assert (write.from_deployment_id, write.to_deployment_id) == ("dep-1", "dep-2")
    assert write.charge_delta_usd == Decimal("0.0046")


def test_an_earlier_correction_arriving_last_is_history_only() -> None:
    later = correction("c2", at=LATER + timedelta(hours=1), input_tokens=5)
    earlier = correction("c1", at=LATER, input_tokens=7)
    plan = plan_corrections([later, earlier], EVENTS, {})
    assert (plan.won, plan.superseded) == (1, 1)
    assert plan.effective[KEY].effective.input_tokens == 5
    assert plan.effective[KEY].corrections == 2
    assert [w.won for w in plan.writes] == [True, False]


def test_a_void_of_a_voided_event_moves_nothing() -> None:
    first = plan_corrections([correction("c1", Action.VOID)], EVENTS, {})
    second = plan_corrections(
        [correction("c2", Action.VOID, at=LATER + timedelta(1))], EVENTS, first.effective
    )
    assert second.won == 1
    assert second.totals == {}
    assert second.dimensions == {}


def test_an_amend_after_a_void_revives_the_event() -> None:
    voided = plan_corrections([correction("c1", Action.VOID)], EVENTS, {})
    revived = plan_corrections(
        [correction("c2", at=LATER + timedelta(1), output_tokens=1)], EVENTS, voided.effective
    )
    assert revived.totals[("t1", "dep-1", EVENT_AT.date())].requests == 1
    assert revived.totals[("t1", "dep-1", EVENT_AT.date())].output_tokens == 1


def test_late_is_set_for_an_event_of_a_closed_month() -> None:
    plan = plan_corrections([correction("c1", Action.VOID)], EVENTS, {}, closed_months={"2026-11"})
    assert plan.writes[0].late


_FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "deployment_id": st.sampled_from(["dep-1", "dep-2", None]),
    "user_id": st.sampled_from(["u-1", "u-2", None]),
    "agent_id": st.sampled_from(["a-1", None]),
    "input_tokens": st.integers(0, 1000),
    "output_tokens": st.integers(0, 1000),
    "cached_input_tokens": st.integers(0, 100),
    "reasoning_tokens": st.integers(0, 100),
    "customer_charge_usd": st.decimals(
        min_value=Decimal(0), max_value=Decimal(5), places=6, allow_nan=False
    ),
}


@st.composite
def corrections(draw: st.DrawFn) -> list[Correction]:
    n = draw(st.integers(1, 6))
    found = []
    for i in range(n):
        action = draw(st.sampled_from([Action.VOID, Action.AMEND]))
        fields: dict[str, object] = {}
        if action is Action.AMEND:
            names = draw(st.sets(st.sampled_from(sorted(_FIELD_VALUES)), min_size=1))
            fields = {name: draw(_FIELD_VALUES[name]) for name in names}
        at = LATER + timedelta(minutes=draw(st.integers(0, 3)))  # ties happen: ids decide
        found.append(correction(f"c{draw(st.integers(0, 9))}-{i}", action, at=at, **fields))
    return found


@settings(max_examples=200, deadline=None)
@given(
    corrections(),
    st.randoms(use_true_random=False),
    st.sampled_from(["dep-1", None]),
    st.booleans(),
)
def test_any_order_one_at_a_time_ends_in_the_winners_contribution(
    cs: list[Correction], random: Any, deployment: str | None, estimated: bool
) -> None:
    event = row(deployment_id=deployment, charge_estimated=estimated)
    events = {("t1", "r1"): event}
    order = list(cs)
    random.shuffle(order)
    totals = totals_contribution(event, original(event))
    dimensions = dimensions_contribution(event, original(event))
    state: dict[Any, EffectiveNow] = {}
    for c in order:
        plan = plan_corrections([c], events, state)
        state = {**state, **plan.effective}
        add_totals(totals, plan.totals)
        add_dimensions(dimensions, plan.dimensions)
    final = effective_after(original(event), winner(cs))
    assert totals == totals_contribution(event, final)
    assert dimensions == dimensions_contribution(event, final)
    assert state[(event.tenant_id, event.occurred_at, event.gateway_request_id)].effective == final


@settings(max_examples=200, deadline=None)
@given(corrections(), st.randoms(use_true_random=False), st.booleans())
def test_a_batch_of_corrections_moves_the_aggregates_from_before_to_its_winner(
    cs: list[Correction], random: Any, corrected_before: bool
) -> None:
    order = list(cs)
    random.shuffle(order)
    current: dict[Any, EffectiveNow] = {}
    if corrected_before:  # the event was voided earlier than any of these
        voided = effective_after(original(EVENT), correction("c-old", Action.VOID, at=EVENT_AT))
        current = {KEY: EffectiveNow(voided, (EVENT_AT, "c-old"), 1)}

    batch = plan_corrections(order, EVENTS, current)

    before = current[KEY].effective if current else original(EVENT)
    final = effective_after(original(EVENT), winner(cs))  # c-old is earlier than any of cs
    totals = add_totals(
        totals_contribution(EVENT, final), totals_contribution(EVENT, before), sign=-1
    )
    dimensions = add_dimensions(
        dimensions_contribution(EVENT, final), dimensions_contribution(EVENT, before), sign=-1
    )
    assert batch.totals == totals
    assert batch.dimensions == dimensions
    assert batch.effective[KEY].effective == final
    assert batch.effective[KEY].corrections == len(cs) + len(current)


def judged_as(verdict: Verdict, c: Correction) -> JudgedCorrection:
    return JudgedCorrection(verdict, c, won=True, late=False, billed_in=None, received_at=LATER)


def test_judging_keeps_the_first_copy_and_settles_the_others_against_it() -> None:
    void, amend = correction("c1", Action.VOID), correction("c2", input_tokens=1)
    reused = correction("c1", input_tokens=1)
    copies = [
        (consumer_record(b"", offset=n), c) for n, c in enumerate([void, void, reused, amend])
    ]
    judging = judge(copies, {})
    assert [c for _, c in judging.candidates] == [void, amend]
    assert judging.outcome.counts == {"duplicate": 1, "conflict": 1}
    [letter] = judging.outcome.dead_letters
    assert letter.record.offset == 2
    assert letter.reason == "conflicting_duplicate"
    assert "action, fields" in letter.detail


def test_judging_an_applied_key_ends_its_wait_and_an_unknown_one_is_judged_again() -> None:
    applied, unknown = correction("c1", Action.VOID), correction("c2", Action.VOID)
    known = {
        applied.key: judged_as(Verdict.APPLIED, applied),
        unknown.key: judged_as(Verdict.UNKNOWN, unknown),
    }
    copies = [(consumer_record(b"", offset=n), c) for n, c in enumerate([applied, unknown])]
    judging = judge(copies, known)
    assert [c for _, c in judging.candidates] == [unknown]
    assert judging.outcome.counts == {"duplicate": 1}
    assert judging.resolved == [applied.key]
