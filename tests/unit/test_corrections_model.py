"""Which correction wins, and what an event is worth once corrected (domain/corrections.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_usage.domain.corrections import (
    CORRIGIBLE_FIELDS,
    Action,
    Correction,
    Effective,
    complete_amend,
    differing_fields,
    effective_after,
    rank,
    same_correction,
    winner,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
ORIGINAL = Effective(
    deployment_id="dep-1",
    user_id="u-1",
    agent_id=None,
    input_tokens=100,
    output_tokens=50,
    cached_input_tokens=10,
    reasoning_tokens=0,
    total_tokens=150,
    customer_charge_usd=Decimal("0.42"),
    customer_charge_cents=42,
    charge_estimated=True,
)


def correction(
    correction_id: str, action: Action = Action.AMEND, minutes: int = 0, **fields: object
) -> Correction:
    return Correction(
        tenant_id="acme",
        correction_id=correction_id,
        gateway_request_id="req-1",
        action=action,
        fields=fields,
        reason="test",
        actor="ops",
        occurred_at=T0 + timedelta(minutes=minutes),
    )


def test_the_latest_occurred_at_wins_then_the_greater_id_by_code_point() -> None:
    early, late = correction("z", minutes=1), correction("a", minutes=2)
    assert winner([late, early]) is late
    upper, lower = correction("Z"), correction("a")  # "Z" < "a" in code points
    assert winner([lower, upper]) is lower
    assert rank(upper) < rank(lower)
    assert winner([]) is None


def test_no_winner_is_the_original_and_a_void_keeps_figures_but_is_voided() -> None:
    assert effective_after(ORIGINAL, None) == ORIGINAL
    voided = effective_after(ORIGINAL, correction("v", Action.VOID))
    assert voided.voided
    assert replace(voided, voided=False) == ORIGINAL


def test_an_amend_lays_its_fields_over_the_original_only() -> None:
    amended = effective_after(ORIGINAL, correction("a", input_tokens=10, user_id=None))
    assert amended.input_tokens == 10
    assert amended.total_tokens == 60  # derived: 10 + 50
    assert amended.user_id is None
    assert amended.deployment_id == "dep-1"
    assert amended.customer_charge_usd == Decimal("0.42")
    assert amended.charge_estimated  # the charge was not corrected


def test_a_corrected_charge_is_no_longer_estimated_and_forgets_the_old_cents() -> None:
    amended = effective_after(ORIGINAL, correction("a", customer_charge_usd=Decimal("1.005")))
    assert amended.customer_charge_usd == Decimal("1.005")
    assert amended.customer_charge_cents is None
    assert not amended.charge_estimated
    same = effective_after(ORIGINAL, correction("s", customer_charge_usd=Decimal("0.420")))
    assert same.charge_estimated  # a complete amend of another field repeats the charge
    by_cents = effective_after(ORIGINAL, correction("b", customer_charge_cents=250))
    assert by_cents.customer_charge_usd == Decimal("2.50")
    assert by_cents.customer_charge_cents == 250


def test_a_later_amend_revives_a_voided_event_and_a_second_void_changes_nothing() -> None:
    void, amend = (
        correction("v", Action.VOID, minutes=1),
        correction("a", minutes=2, input_tokens=1),
    )
    revived = effective_after(ORIGINAL, winner([void, amend]))
    assert not revived.voided
    assert revived.input_tokens == 1
    again = correction("w", Action.VOID, minutes=3)
    once = effective_after(ORIGINAL, winner([void]))
    assert effective_after(ORIGINAL, winner([void, again])) == once


def test_a_repeat_is_the_same_correction_and_a_reused_id_is_not() -> None:
    first = correction("c", input_tokens=5)
    assert same_correction(first, replace(first, event_occurred_at=T0))  # a hint, not content
    other = replace(first, fields={"input_tokens": 6}, reason="other")
    assert not same_correction(first, other)
    assert differing_fields(first, other) == ["fields", "reason"]


def test_a_complete_amend_sends_every_field_from_the_current_values() -> None:
    fields = complete_amend(ORIGINAL, {"output_tokens": 70})
    assert set(fields) == set(CORRIGIBLE_FIELDS)
    assert fields["output_tokens"] == 70
    assert fields["total_tokens"] == 170
    assert fields["customer_charge_usd"] == Decimal("0.42")
    charge_only = complete_amend(ORIGINAL, {"customer_charge_usd": Decimal("3")})
    assert "customer_charge_cents" not in charge_only  # the old cents described the old charge
    with pytest.raises(ValueError, match="cannot be corrected: model"):
        complete_amend(ORIGINAL, {"model": "x"})


_corrections = st.lists(
    st.builds(
        correction,
        correction_id=st.text(alphabet="abAB", min_size=1, max_size=2),
        action=st.sampled_from(Action),
        minutes=st.integers(0, 3),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda c: c.correction_id,
)


@given(_corrections, st.randoms(use_true_random=False))
def test_applying_corrections_one_at_a_time_in_any_order_ends_in_the_same_state(
    corrections: list[Correction], shuffle: object
) -> None:
    # What a consumer does: keep the current winner, replace it when a new one ranks higher.
    arrived = list(corrections)
    shuffle.shuffle(arrived)  # type: ignore[attr-defined]
    current: Correction | None = None
    for new in arrived:
        if current is None or rank(new) > rank(current):
            current = new
    assert current is winner(corrections)
    assert effective_after(ORIGINAL, current) == effective_after(ORIGINAL, winner(corrections))
