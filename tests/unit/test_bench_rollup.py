"""`bench rollup`'s pure pieces: its arguments, the synthetic month, and the check that the
rollup's lines and the raw query agree (so the benchmark cannot report a fast wrong answer)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from llm_usage.bench.rollup import (
    batches,
    disagreements,
    month_events,
    parse_sizes,
    previous_period,
    run_order,
    throughput_drop,
)
from llm_usage.core.errors import ConfigurationError
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.usage import Usage
from llm_usage.rollup.lines import usage_line, usage_lines
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.invoice_lines import GroupUsage
from llm_usage.storage.usage_totals import daily_totals

D = Decimal
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "events", "expected"),
    [
        ("1000000,10000000", 10_000_000, [1_000_000, 10_000_000]),
        ("1000000", 10_000_000, [1_000_000, 10_000_000]),
        ("5, 50 ,", 50, [5, 50]),
    ],
)
def test_sizes_end_with_all_events(text: str, events: int, expected: list[int]) -> None:
    assert parse_sizes(text, events=events) == expected


@pytest.mark.parametrize("text", ["", "a,b", "0,10", "10,5", "5,5", "5,11"])
def test_bad_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(ConfigurationError, match="--sizes"):
        parse_sizes(text, events=10)


@pytest.mark.parametrize(
    ("now", "period"),
    [
        (NOW, "2026-10"),
        (datetime(2026, 1, 1, 0, 0, tzinfo=UTC), "2025-12"),
        (datetime(2026, 3, 31, 23, 59, tzinfo=UTC), "2026-02"),
    ],
)
def test_the_month_billed_is_the_last_whole_one(now: datetime, period: str) -> None:
    assert previous_period(now) == period


def _month(count: int, seed: int = 7) -> list[UsageRow]:
    return list(
        month_events(
            random.Random(seed),
            count=count,
            period="2026-02",
            id_prefix="p",
            tenants=5,
            deployments=3,
        )
    )


def test_generated_events_are_valid_as_the_consumer_would_read_them() -> None:
    for event in _month(300):
        published = {**event._asdict(), "occurred_at": event.occurred_at.isoformat()}
        validated = decode_usage_event(json.dumps(published, default=str).encode(), now=NOW)
        assert validated == event


def test_generated_events_fill_the_month_in_time_order_with_exact_charges() -> None:
    events = _month(2_000)
    times = [event.occurred_at for event in events]
    assert times == sorted(times)
    assert times[0] >= datetime(2026, 2, 1, tzinfo=UTC)
    assert times[-1] < datetime(2026, 3, 1, tzinfo=UTC)
    assert {t.day for t in times} == set(range(1, 29))
    assert len({event.gateway_request_id for event in events}) == 2_000
    assert {event.tenant_id for event in events} == {f"tenant-{n:05d}" for n in range(5)}
    assert {event.deployment_id for event in events} == {f"deployment-{n}" for n in (1, 2, 3)}
    for event in events:
        # The markup is exactly 20 %, the cents are the charge rounded half up, nothing is lost.
        assert event.upstream_cost_usd is not None
        assert event.customer_charge_usd == event.upstream_cost_usd * D("1.2")
        assert event.customer_charge_cents == usd_to_cents(event.customer_charge_usd)
        assert event.total_tokens == event.input_tokens + event.output_tokens


def test_generated_events_are_repeatable_from_the_seed() -> None:
    assert _month(100, seed=3) == _month(100, seed=3)
    assert _month(100, seed=3) != _month(100, seed=4)


def test_the_aggregate_of_generated_events_is_the_consumers() -> None:
    events = _month(1_000)
    totals = daily_totals(events)
    assert sum(t.requests for t in totals.values()) == 1_000
    assert sum(t.charge_usd for t in totals.values()) == sum(e.customer_charge_usd for e in events)


def test_batches_keep_every_event_in_order() -> None:
    events = _month(23)
    chunks = list(batches(iter(events), 5))
    assert [len(chunk) for chunk in chunks] == [5, 5, 5, 5, 3]
    assert [event for chunk in chunks for event in chunk] == events


def _raw(tenant: str, deployment: str | None, usd: str, tokens: tuple[int, int, int]) -> GroupUsage:
    return (tenant, deployment, Usage(D(usd), *tokens))


RAW = [
    _raw("t1", "a", "1.005", (100, 20, 3)),
    _raw("t1", None, "0.004", (5, 5, 1)),  # rounds to 0 cents: no line
    _raw("t2", "b", "12.344999", (7, 8, 2)),
]


def test_lines_built_from_the_same_sums_agree() -> None:
    lines = [
        line
        for tenant in ("t1", "t2")
        for line in usage_lines(
            tenant,
            "2026-02",
            {
                deployment_id: usage
                for tenant_id, deployment_id, usage in RAW
                if tenant_id == tenant
            },
        )
    ]
    assert [line.amount_cents for line in lines] == [101, 1234]
    assert disagreements(lines, RAW) == []


def test_every_difference_is_reported() -> None:
    good = usage_line("t1", "2026-02", "a", Usage(D("1.005"), 100, 20, 3))
    off_by_a_cent = usage_line("t2", "2026-02", "b", Usage(D("12.355"), 7, 8, 2))
    zero_cents = usage_line("t1", "2026-02", None, Usage(D("0.004"), 5, 5, 1))
    problems = disagreements([good, good, off_by_a_cent, zero_cents], RAW)
    assert len(problems) == 3
    assert "('t1', 'a'): more than one line" in problems
    assert (
        "('t1', None): raw events say (cents, qty, in, out, requests) = None, "
        "the rollup's line says (0, 10, 5, 5, 1)"
    ) in problems
    assert any("('t2', 'b')" in p and "(1234, 15, 7, 8, 2)" in p for p in problems)
    missing = disagreements([good], RAW)
    assert missing == [
        "('t2', 'b'): raw events say (cents, qty, in, out, requests) = (1234, 15, 7, 8, 2), "
        "the rollup's line says None"
    ]


def test_the_consumer_runs_alternate_which_goes_first() -> None:
    assert run_order(2) == [False, True, True, False]
    assert run_order(3) == [False, True, True, False, False, True]


def test_the_drop_compares_mean_rates() -> None:
    assert throughput_drop([100.0, 120.0], [99.0, 99.0]) == pytest.approx(0.1)
    assert throughput_drop([100.0], [110.0]) == pytest.approx(-0.1)
