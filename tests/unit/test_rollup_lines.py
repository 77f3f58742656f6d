"""The invoice line builder: exact sums rounded once, awkward values, true-ups."""

from __future__ import annotations

import random
from decimal import Decimal

from llm_usage.domain.money import round_half_up, usd_to_cents
from llm_usage.domain.usage import Usage
from llm_usage.rollup.lines import Billed, adjustment_line, billed_so_far, usage_line, usage_lines
from tests.money import exact_sum

D = Decimal


def test_millions_of_tiny_charges_round_once_not_per_event() -> None:
    # 2,000,001 charges of 0.000005: each rounds to 0 cents, their exact sum is 10.000005 USD,
    # i.e. 1000.0005 cents, billed as 1000.
    charges = [D("0.000005")] * 2_000_001
    total = exact_sum(charges)
    assert total == D("10.000005")
    line = usage_line("t1", "2026-11", "dep-1", Usage(total, 1, 2, len(charges)))
    assert line.amount_cents == 1000  # 1000.0005 cents rounds to 1000
    assert sum(usd_to_cents(c) for c in charges[:10]) == 0  # what pre-rounding would bill


def test_a_sum_that_lands_on_a_half_cent_rounds_up() -> None:
    total = exact_sum([D("0.0025"), D("0.0025"), D("0.0000")])  # 0.005 exactly: half a cent
    assert usage_line("t1", "2026-11", None, Usage(total, 0, 0, 3)).amount_cents == 1
    assert usd_to_cents(D("0.0025")) * 2 == 0  # pre-rounded cents would bill nothing


def test_twenty_significant_digits_stay_exact() -> None:
    charges = [D("12345678.901234567891"), D("0.000000000000000009")]
    line = usage_line("t1", "2026-11", "d", Usage(exact_sum(charges), 0, 0, 2))
    assert line.amount_cents == int(round_half_up(exact_sum(charges) * 100))
    assert line.amount_cents == 1234567890


def test_the_line_says_what_the_contract_says() -> None:
    line = usage_line("t1", "2026-11", None, Usage(D("12.345"), 1200000, 3000, 42))
    assert line.as_json() == {
        "tenant_id": "t1",
        "period": "2026-11",
        "deployment_id": None,
        "kind": "llm_usage",
        "resource_kind": "llm_tokens",
        "unit": "token",
        "unit_price_cents": None,
        "qty": 1203000,
        "amount_cents": 1235,
        "description": "LLM tokens \u2014 1200000 in / 3000 out (42 requests)",
        "meta": {"input_tokens": 1200000, "output_tokens": 3000, "requests": 42},
        "closed": False,
    }


def test_a_null_deployment_is_its_own_line_and_zero_cent_lines_are_left_out() -> None:
    lines = usage_lines(
        "t1",
        "2026-11",
        {
            "dep-b": Usage(D("1"), 1, 1, 1),
            None: Usage(D("2"), 1, 1, 1),
            "dep-a": Usage(D("0.004999"), 1, 1, 1),  # rounds to 0 cents
        },
    )
    assert [(line.deployment_id, line.amount_cents) for line in lines] == [
        (None, 200),
        ("dep-b", 100),
    ]


def test_a_true_up_bills_what_the_total_rounds_to_now_minus_what_was_billed() -> None:
    billed = Billed(cents=1, usage=Usage(D(0), 10, 20, 2))  # 0.005 billed as 1 cent
    now = Usage(D("0.009"), 15, 25, 3)  # a late 0.004: the exact total now rounds to 1 cent
    assert (
        adjustment_line(
            tenant_id="t1",
            period="2026-12",
            deployment_id="d",
            original_period="2026-11",
            total_now=now,
            billed=billed,
        )
        is None
    ), "a true-up of 0 cents is left out"
    later = Usage(D("0.0151"), 20, 30, 4)
    line = adjustment_line(
        tenant_id="t1",
        period="2026-12",
        deployment_id="d",
        original_period="2026-11",
        total_now=later,
        billed=billed,
    )
    assert line is not None
    assert line.amount_cents == 1  # round(1.51) - 1
    assert line.kind == "llm_usage_adjustment"
    assert line.meta == {
        "input_tokens": 10,
        "output_tokens": 10,
        "requests": 2,
        "original_period": "2026-11",
    }
    assert line.qty == 20
    assert line.description == (
        "LLM tokens \u2014 10 in / 10 out (2 requests) \u2014 adjustment for 2026-11"
    )


def test_true_ups_keep_every_month_at_its_total_rounded_once() -> None:
    rng = random.Random(7)
    exact = D(0)
    billed_lines = [usage_line("t1", "2026-11", "d", Usage(exact, 0, 0, 0))]
    for round_ in range(30):
        exact += exact_sum(D(rng.randrange(0, 10_000)) / D(1_000_000) for _ in range(7))
        billed = billed_so_far(billed_lines)[("t1", "d", "2026-11")]
        line = adjustment_line(
            tenant_id="t1",
            period=f"2027-{round_ % 12 + 1:02d}",
            deployment_id="d",
            original_period="2026-11",
            total_now=Usage(exact, 0, 0, 0),
            billed=billed,
        )
        if line is not None:
            billed_lines.append(line)
        assert sum(line.amount_cents for line in billed_lines) == usd_to_cents(exact)


def test_late_usage_alone_never_makes_a_negative_true_up() -> None:
    # Charges are never negative, so without corrections a month's exact total only grows and
    # never rounds lower than what was billed for it.
    for cents_billed, total in [(1, D("0.005")), (2, D("0.015")), (0, D("0.0049"))]:
        line = adjustment_line(
            tenant_id="t",
            period="2026-12",
            deployment_id=None,
            original_period="2026-11",
            total_now=Usage(total + D("0.0001"), 0, 0, 0),
            billed=Billed(cents_billed),
        )
        assert line is None or line.amount_cents > 0


def test_the_progress_bar_draws_in_place_and_only_for_long_runs() -> None:
    import io  # noqa: PLC0415

    from llm_usage.cli.rollup import ProgressBar  # noqa: PLC0415

    stream = io.StringIO()
    bar = ProgressBar(stream, width=10)
    bar(100, 100)  # a short run: nothing drawn
    bar.finish()
    assert stream.getvalue() == ""
    bar(200, 1000)
    bar(1000, 1000)
    bar.finish()
    assert stream.getvalue() == "\rtenants [##........] 200/1000\rtenants [##########] 1000/1000\n"


def test_a_void_after_the_close_is_a_negative_true_up_naming_its_corrections() -> None:
    billed = Billed(150, Usage(D("0"), 300, 120, 3))
    line = adjustment_line(
        tenant_id="t1",
        period="2026-12",
        deployment_id="d",
        original_period="2026-11",
        total_now=Usage(D("1.004"), 200, 80, 2),  # one of the three requests voided
        billed=billed,
        correction_ids=["c-9", "c-10"],
    )
    assert line is not None
    assert line.amount_cents == 100 - 150
    assert line.qty == -140
    assert line.meta["requests"] == -1
    assert line.meta["correction_ids"] == ["c-10", "c-9"]
    assert "-100 in / -40 out (-1 requests)" in line.description
    unnamed = adjustment_line(
        tenant_id="t1",
        period="2026-12",
        deployment_id="d",
        original_period="2026-11",
        total_now=Usage(D("1.004"), 200, 80, 2),
        billed=billed,
    )
    assert unnamed is not None
    assert "correction_ids" not in unnamed.meta
