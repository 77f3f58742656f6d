"""`prices preview`'s arithmetic: sums of tokens priced exactly under today's row, events without
a row kept at their billed charge, lines beside the billed ones."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

from llm_usage.domain.invoices import ADJUSTMENT_KIND, USAGE_KIND, InvoiceLine
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.price_preview import PairUsage, cost_of_events, preview_lines
from llm_usage.domain.prices import cost_usd, new_price
from tests.money import exact_sum

D = Decimal
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICE = new_price(
    "openai",
    "gpt-4o",
    T0,
    input=D("2.5"),
    cached_input=D("1.25"),
    output=D("10"),
    reasoning=D("12.000001"),
    request_fee_usd=D("0.0001"),
)


def _usage(
    tenant: str, deployment: str | None, provider: str | None, **fields: object
) -> PairUsage:
    values: dict[str, object] = {
        "tenant_id": tenant,
        "deployment_id": deployment,
        "provider": provider,
        "model": "gpt-4o",
        "events": 1,
        "charge_usd": D("0.01"),
        "priceable_events": 1,
        "input_tokens": 1000,
        "output_tokens": 100,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "unpriceable_charge_usd": D(0),
        **fields,
    }
    return PairUsage(**values)  # type: ignore[arg-type]


def test_pricing_summed_tokens_is_the_exact_sum_of_each_event_s_cost() -> None:
    generator = random.Random(22)
    events = []
    for _ in range(200):
        input_tokens = generator.randint(0, 10**9)
        output_tokens = generator.randint(0, 10**7)
        events.append(
            {
                "input_tokens": input_tokens,
                "cached_input_tokens": generator.randint(0, input_tokens),
                "output_tokens": output_tokens,
                "reasoning_tokens": generator.randint(0, output_tokens),
            }
        )
    summed = {name: sum(event[name] for event in events) for name in events[0]}
    usage = _usage("t", "d", "openai", events=200, priceable_events=200, **summed)
    assert cost_of_events(PRICE, usage) == exact_sum(cost_usd(PRICE, **e) for e in events)


def test_lines_are_repriced_beside_what_was_billed() -> None:
    prices_now = {PRICE.pair: PRICE}
    usage = [
        # 1000 x 2.5 + 100 x 10 per million, + fee: 0.0036 a request; 3 requests + 0.5 kept
        _usage(
            "t1",
            "d1",
            "openai",
            events=4,
            priceable_events=3,
            input_tokens=3000,
            output_tokens=300,
            charge_usd=D("9"),
            unpriceable_charge_usd=D("0.5"),
        ),
        _usage("t1", "d1", "other", events=2, charge_usd=D("0.25")),  # no row now: kept
        _usage("t1", None, None, events=1, charge_usd=D("0.004")),  # no provider: kept
        _usage("t2", "d9", "openai", events=1),  # its line was left out at 0 cents
    ]
    billed = [
        InvoiceLine("t1", "2026-05", "d1", USAGE_KIND, 3300, 925, "x"),
        InvoiceLine("t1", "2026-05", None, USAGE_KIND, 2, 1, "x"),
        InvoiceLine("t0", "2026-05", "gone", USAGE_KIND, 1, 7, "x"),  # no events any more
        InvoiceLine(
            "t1", "2026-05", "d1", ADJUSTMENT_KIND, 1, 99, "x", {"original_period": "2026-04"}
        ),
    ]
    lines = preview_lines("2026-05", billed, usage, prices_now)
    by_key = {(line.tenant_id, line.deployment_id): line for line in lines}
    assert list(by_key) == [("t0", "gone"), ("t1", None), ("t1", "d1"), ("t2", "d9")]
    d1 = by_key[("t1", "d1")]
    assert d1.preview_usd == D("0.0108") + D("0.5") + D("0.25")
    assert (d1.billed_cents, d1.preview_cents, d1.difference_cents) == (925, 76, -849)
    assert (d1.events, d1.kept_events) == (6, 3)
    nameless = by_key[("t1", None)]
    assert (nameless.billed_cents, nameless.preview_cents, nameless.kept_events) == (1, 0, 1)
    gone = by_key[("t0", "gone")]
    assert (gone.billed_cents, gone.preview_cents, gone.events) == (7, 0, 0)
    left_out = by_key[("t2", "d9")]
    assert left_out.billed_cents == 0
    assert left_out.preview_cents == usd_to_cents(D("0.0036")) == 0


def test_half_a_cent_summed_exactly_rounds_up_once() -> None:
    half = new_price("p", "m", T0, input=D("2.5"), output=D(0))  # 1000 tokens: 0.0025
    usage = [
        _usage(
            "t",
            "d",
            "p",
            model="m",
            events=2,
            priceable_events=2,
            input_tokens=2000,
            output_tokens=0,
        )
    ]
    [line] = preview_lines("2026-05", [], usage, {half.pair: half})
    assert line.preview_usd == D("0.005")
    assert line.preview_cents == 1
