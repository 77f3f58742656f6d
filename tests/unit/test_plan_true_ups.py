"""Plan-inclusive months: which period charge is in effect, the true-up line beside the usage
line, and adjustments after close that true up to the period charge."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.period_charges import PeriodCharge, effective_period_charges, supersedes
from llm_usage.domain.periods import following_period
from llm_usage.domain.usage import Usage
from llm_usage.rollup.lines import (
    Billed,
    adjustment_line,
    billed_so_far,
    plan_true_up_line,
    plan_true_up_lines,
    usage_lines,
)

D = Decimal
AT = datetime(2026, 11, 1, 0, 5, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def charge(
    usd: str,
    *,
    charge_id: str = "pc-1",
    tenant: str = "t1",
    deployment: str | None = "dep-1",
    at: datetime = AT,
) -> PeriodCharge:
    return PeriodCharge(tenant, charge_id, deployment, "2026-10", D(usd), at)


@pytest.mark.parametrize(
    ("usage_cents", "period_charge", "true_up"),
    [
        (1234, "50", 3766),  # usage below the plan: the true-up adds the rest
        (6000, "50", -1000),  # usage above the plan: the true-up takes it back
        (5000, "50", None),  # equal: a 0-cent line is left out
        (0, "49.995", 5000),  # no usage line: the whole charge, rounded half up once
        (1, "0.004", -1),  # 0.4 cents rounds to 0
        (0, "0", None),
    ],
)
def test_the_true_up_bills_the_period_charge_minus_the_usage_line(
    usage_cents: int, period_charge: str, true_up: int | None
) -> None:
    line = plan_true_up_line(
        period="2026-10", usage_line_cents=usage_cents, charge=charge(period_charge)
    )
    if true_up is None:
        assert line is None
        return
    assert line is not None
    assert line.amount_cents == true_up
    assert usage_cents + line.amount_cents == usd_to_cents(D(period_charge))


def test_the_true_up_line_says_what_it_trues_up_to() -> None:
    line = plan_true_up_line(period="2026-10", usage_line_cents=1234, charge=charge("49.9950"))
    assert line is not None
    assert line.as_json() == {
        "tenant_id": "t1",
        "period": "2026-10",
        "deployment_id": "dep-1",
        "kind": "llm_usage_plan_true_up",
        "resource_kind": "llm_tokens",
        "unit": "token",
        "unit_price_cents": None,
        "qty": 0,
        "amount_cents": 3766,
        "description": "Plan-inclusive true-up to the period charge of 49.9950 USD",
        "meta": {"period_charge_id": "pc-1", "period_charge_usd": "49.9950"},
        "closed": False,
    }


def test_true_ups_pair_with_their_own_deployment_and_list_null_first() -> None:
    usage = usage_lines(
        "t1", "2026-10", {"dep-1": Usage(D("10"), 1, 1, 1), None: Usage(D("2"), 1, 1, 1)}
    )
    charges = effective_period_charges(
        [charge("15"), charge("1", charge_id="pc-n", deployment=None), charge("7", tenant="t2")]
    )
    lines = plan_true_up_lines("2026-10", usage, charges)
    assert [(x.tenant_id, x.deployment_id, x.amount_cents) for x in lines] == [
        ("t1", None, -100),
        ("t1", "dep-1", 500),
        ("t2", "dep-1", 700),  # a deployment with a plan and no usage bills the plan
    ]


@pytest.mark.parametrize(
    ("later", "earlier", "wins"),
    [
        (
            charge("2", at=AT + timedelta(seconds=1), charge_id="a"),
            charge("1", charge_id="z"),
            True,
        ),
        (
            charge("2", at=AT - timedelta(seconds=1), charge_id="z"),
            charge("1", charge_id="a"),
            False,
        ),
        (charge("2", charge_id="pc-2"), charge("1", charge_id="pc-1"), True),  # same time: id
        (charge("2", charge_id="pc-1"), charge("1", charge_id="pc-2"), False),
    ],
)
def test_a_later_charge_supersedes_by_occurred_at_then_id(
    later: PeriodCharge, earlier: PeriodCharge, wins: bool
) -> None:
    assert supersedes(later, earlier) is wins
    effective = effective_period_charges([later, earlier])
    assert effective[("t1", "dep-1")] is (later if wins else earlier)
    # Whatever order they are read in.
    assert effective_period_charges([earlier, later]) == effective


def test_each_tenant_and_deployment_has_its_own_effective_charge() -> None:
    found = effective_period_charges(
        [charge("1"), charge("2", deployment=None), charge("3", tenant="t2")]
    )
    assert {key: c.period_charge_usd for key, c in found.items()} == {
        ("t1", "dep-1"): D(1),
        ("t1", None): D(2),
        ("t2", "dep-1"): D(3),
    }


def test_after_close_a_superseding_charge_is_billed_as_the_difference() -> None:
    closed = usage_lines("t1", "2026-10", {"dep-1": Usage(D("12.34"), 100, 50, 3)})
    closed += plan_true_up_lines("2026-10", closed, effective_period_charges([charge("50")]))
    billed = billed_so_far(closed)[("t1", "dep-1", "2026-10")]
    assert billed.cents == 5000
    line = adjustment_line(
        tenant_id="t1",
        period="2026-11",
        deployment_id="dep-1",
        original_period="2026-10",
        total_now=Usage(D("12.34"), 100, 50, 3),
        billed=billed,
        period_charge=charge("45.555", charge_id="pc-2"),
    )
    assert line is not None
    assert line.amount_cents == 4556 - 5000
    assert line.qty == 0  # no late usage: the tokens were billed by the closed usage line
    assert line.meta == {
        "input_tokens": 0,
        "output_tokens": 0,
        "requests": 0,
        "original_period": "2026-10",
        "period_charge_id": "pc-2",
        "period_charge_usd": "45.555",
    }


def test_late_usage_of_a_plan_month_changes_no_cents() -> None:
    line = adjustment_line(
        tenant_id="t1",
        period="2026-11",
        deployment_id="dep-1",
        original_period="2026-10",
        total_now=Usage(D("99"), 10, 10, 2),
        billed=Billed(5000, Usage(D(0), 5, 5, 1)),
        period_charge=charge("50"),
    )
    assert line is None


def test_the_lines_of_a_month_add_up_to_its_target_through_random_rounds() -> None:
    """Any sequence of late usage and period charges for a closed month, trued up month after
    month, keeps the invariant for that month after every round."""
    rng = random.Random(22)
    for _ in range(300):
        lines = []
        usage = Usage()
        billing_month = "2026-10"
        charges: list[PeriodCharge] = []
        for round_number in range(rng.randint(1, 6)):
            if rng.random() < 0.6:
                cents = rng.randint(0, 10**6)
                usage = usage + Usage(D(cents) / 1000, 1, 1, 1)
            if rng.random() < 0.5:
                at = AT + timedelta(seconds=rng.randint(0, 5))
                usd = D(rng.randint(0, 10**6)) / 1000
                charges.append(charge(str(usd), charge_id=f"pc-{len(charges)}", at=at))
            effective = effective_period_charges(charges).get(("t1", "dep-1"))
            if round_number == 0:  # the month's own (closing) run
                lines = usage_lines("t1", "2026-10", {"dep-1": usage})
                lines += plan_true_up_lines(
                    "2026-10", lines, {} if effective is None else {("t1", "dep-1"): effective}
                )
            else:  # a later open month's run trues the closed month up
                billing_month = following_period(billing_month)
                billed = billed_so_far(lines).get(("t1", "dep-1", "2026-10"), Billed())
                line = adjustment_line(
                    tenant_id="t1",
                    period=billing_month,
                    deployment_id="dep-1",
                    original_period="2026-10",
                    total_now=usage,
                    billed=billed,
                    period_charge=effective,
                )
                lines += [] if line is None else [line]
            target = usage.charge_usd if effective is None else effective.period_charge_usd
            assert sum(x.amount_cents for x in lines) == usd_to_cents(target)
