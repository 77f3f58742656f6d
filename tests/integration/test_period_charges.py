"""Period charges (`llm_period_charge_recorded`) against a real Kafka and a real PostgreSQL:
stored exactly once by the usage consumer, ignored by the budget consumer, and billed by the
rollup as a true-up to the period charge, before and after the month closes.

Months are taken relative to the tests' clock (tests/clock.py): the months closed here are the
few before the current one, so the file is in the Makefile's CALENDAR_TESTS."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.periods import add_months, period_of
from llm_usage.rollup.run import close_month, run_rollup
from llm_usage.runtime.handler import BatchResult
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    encode,
    header,
    produce,
    read_topic,
    topic_record_count,
    unique,
    usage_event,
)
from tests.integration.test_rollup import store
from tests.integration.test_usage_consumer import consume_until_idle, events_counted
from tests.records import consumer_record


def period_charge(
    tenant: str,
    period: str,
    usd: str,
    *,
    deployment: str | None = "dep-1",
    charge_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """A valid period charge; by default it occurred earlier today (after any month named)."""
    return {
        "event_type": "llm_period_charge_recorded",
        "schema_version": 1,
        "period_charge_id": charge_id or unique("pc"),
        "tenant_id": tenant,
        "deployment_id": deployment,
        "period": period,
        "period_charge_usd": usd,
        "occurred_at": clock.iso(at or clock.earlier_today()),
    }


def month(offset: int) -> str:
    """The month `offset` months from the tests' current one (negative: ended months)."""
    return period_of(add_months(clock.this_month(), offset))


def usage_in(
    tenant: str, period: str, charge: str, deployment: str | None = "dep-1"
) -> dict[str, Any]:
    return usage_event(
        tenant,
        deployment_id=deployment,
        customer_charge_usd=charge,
        occurred_at=f"{period}-15T12:00:00Z",
        input_tokens=100,
        output_tokens=10,
    )


async def stored_charges(pool: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT period_charge_id, deployment_id, period, period_charge_usd, occurred_at "
        "FROM period_charges WHERE tenant_id = $1 ORDER BY occurred_at",
        tenant,
    )


async def billed_per_month(pool: asyncpg.Pool, tenant: str) -> dict[tuple[str | None, str], int]:
    """Cents billed per (deployment, original month), over every stored line of `tenant`."""
    billed: dict[tuple[str | None, str], int] = defaultdict(int)
    for row in await pool.fetch(
        "SELECT deployment_id, original_period, amount_cents FROM invoice_lines "
        "WHERE tenant_id = $1",
        tenant,
    ):
        billed[(row["deployment_id"], row["original_period"])] += row["amount_cents"]
    return dict(billed)


# --- the usage consumer, through Kafka ------------------------------------------------------


async def test_a_period_charge_is_stored_once_and_a_conflicting_copy_is_dead_lettered(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    key = tenant.encode()
    charge = period_charge(tenant, month(-1), "49.995", at=clock.earlier_today())
    # The same fact spelled otherwise: a JSON number read from its digits, another offset.
    respelled = json.dumps(
        {
            **charge,
            "period_charge_usd": "CHARGE",
            "occurred_at": datetime.fromisoformat(charge["occurred_at"])
            .astimezone(UTC)
            .isoformat(),
        }
    ).replace('"CHARGE"', "49.9950")
    conflicting = {**charge, "period_charge_usd": "12.00"}
    # A usage event with a markup mode nobody knew of: stored as sent, never refused.
    usage = usage_event(tenant, markup_mode="tiered_by_volume")
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(key, encode(charge)), (key, encode(usage)), (key, respelled.encode())],
    )
    first = await consume_until_idle(topics)
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(key, encode(charge)), (key, encode(conflicting))],
    )
    second = await consume_until_idle(topics)

    assert events_counted(first, "recorded") == 2  # the charge and the usage event
    assert events_counted(first, "duplicate") == 1
    assert events_counted(second, "duplicate") == 1
    assert events_counted(second, "conflict") == 1
    rows = await stored_charges(pool, tenant)
    assert [(r["period_charge_id"], r["period_charge_usd"], r["period"]) for r in rows] == [
        (charge["period_charge_id"], Decimal("49.995"), month(-1))
    ]
    mode = await pool.fetchval(
        "SELECT markup_mode FROM llm_usage_events WHERE gateway_request_id = $1",
        usage["gateway_request_id"],
    )
    assert mode == "tiered_by_volume"
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 1
    [dead] = await read_topic(topics.settings.kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "conflicting_duplicate"
    assert "period_charge_usd" in header(dead, "dlq.detail")
    assert dead.value == encode(conflicting)


async def test_an_invalid_period_charge_is_a_schema_violation(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    broken = period_charge(tenant, "2026-13", "1")
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, [(None, encode(broken))])
    await consume_until_idle(topics)
    [dead] = await read_topic(topics.settings.kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "schema_violation"
    assert header(dead, "dlq.detail").startswith("period:")
    assert await stored_charges(pool, tenant) == []


async def test_the_budget_consumer_counts_nothing_of_a_period_charge(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    usage = usage_event(tenant, customer_charge_usd="0.25")
    records = [
        consumer_record(encode(period_charge(tenant, month(0), "1000")), offset=0),
        consumer_record(encode(usage), offset=1),
    ]
    outcome = await BudgetCounter(pool=pool, clock=clock.now).record_batch(records)
    assert outcome.counts == Counter({BatchResult.RECORDED: 1})
    assert outcome.dead_letters == []
    spend = await pool.fetchval(
        "SELECT spend_usd FROM budget_spend WHERE tenant_id = $1 AND scope_type = 'tenant' "
        "AND \"window\" = 'monthly'",
        tenant,
    )
    assert spend == Decimal("0.25")


# --- the rollup ------------------------------------------------------------------------------


def true_ups(lines: Sequence[Any]) -> list[tuple[str | None, int, str]]:
    return [
        (line.deployment_id, line.amount_cents, line.meta["period_charge_id"])
        for line in lines
        if line.kind == "llm_usage_plan_true_up"
    ]


async def test_the_rollup_bills_the_latest_period_charge_of_an_open_month(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant = unique("tenant")
    period = month(-1)
    early = clock.earlier_today() - timedelta(hours=1)
    late = clock.earlier_today()
    await store(
        pool,
        [
            usage_in(tenant, period, "12.344"),  # 1234 cents
            usage_in(tenant, period, "80", deployment="dep-over"),
            usage_in(tenant, period, "3", deployment="dep-free"),  # no plan: as today
            period_charge(tenant, period, "10", charge_id="pc-b", at=early),
            # Same time: the greater id wins; a later time wins over any id.
            period_charge(tenant, period, "20", charge_id="pc-c", at=early),
            period_charge(tenant, period, "49.995", charge_id="pc-a", at=late),
            period_charge(tenant, period, "50", deployment="dep-over", charge_id="pc-o"),
            period_charge(tenant, period, "7", deployment=None, charge_id="pc-n"),  # no usage
        ],
    )
    result = await run_rollup(pool, period=period, tenant_id=tenant)
    assert true_ups(result.lines) == [
        (None, 700, "pc-n"),
        ("dep-1", 5000 - 1234, "pc-a"),
        ("dep-over", 5000 - 8000, "pc-o"),
    ]
    [true_up] = [line for line in result.lines if line.meta.get("period_charge_id") == "pc-a"]
    assert true_up.qty == 0
    assert true_up.meta["period_charge_usd"] == "49.995"
    assert await billed_per_month(pool, tenant) == {
        (None, period): 700,
        ("dep-1", period): 5000,
        ("dep-over", period): 5000,
        ("dep-free", period): 300,
    }
    again = await run_rollup(pool, period=period, tenant_id=tenant)
    assert again.lines == result.lines


async def test_a_period_charge_superseded_after_close_is_adjusted_in_the_next_open_month(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant = unique("tenant")
    closed, billing = month(-2), month(-1)
    first_at = clock.earlier_today() - timedelta(hours=2)
    await store(
        pool,
        [usage_in(tenant, closed, "30"), period_charge(tenant, closed, "50", at=first_at)],
    )
    await close_month(pool, period=closed, now=clock.now())
    assert await billed_per_month(pool, tenant) == {("dep-1", closed): 5000}

    # An older charge arriving late does not supersede; a later one does.
    await store(
        pool,
        [
            period_charge(tenant, closed, "99", at=first_at - timedelta(hours=1)),
            period_charge(tenant, closed, "42.125", charge_id="pc-new", at=clock.earlier_today()),
        ],
    )
    result = await run_rollup(pool, period=billing)
    [adjustment] = [line for line in result.lines if line.tenant_id == tenant]
    assert adjustment.kind == "llm_usage_adjustment"
    assert adjustment.period == billing
    assert adjustment.amount_cents == 4213 - 5000
    assert adjustment.meta["original_period"] == closed
    assert adjustment.meta["period_charge_id"] == "pc-new"
    assert adjustment.qty == 0
    assert await billed_per_month(pool, tenant) == {("dep-1", closed): 4213}


async def test_every_month_bills_its_period_charge_or_its_usage_through_several_rounds(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    """Usage (some late), period charges (some superseding after close) and closes, round after
    round: after each close, every (deployment, month) billed so far adds up to its target."""
    _, pool = rollup_db
    rng = random.Random(22)
    tenant = unique("tenant")
    deployments: list[str | None] = ["dep-a", "dep-b", None]
    months = [month(offset) for offset in range(-4, 0)]  # four ended months, closed in order
    usage: dict[tuple[str | None, str], Decimal] = defaultdict(Decimal)
    charges: dict[tuple[str | None, str], tuple[datetime, str, Decimal]] = {}
    start = datetime.combine(clock.today(), time(0), UTC)
    tick = iter(range(10**6))

    async def add(period: str, *, usage_events: int, plans: int) -> None:
        batch: list[dict[str, Any]] = []
        for _ in range(usage_events):
            deployment = rng.choice(deployments)
            charge = f"{rng.randint(0, 999)}.{rng.randint(0, 9999):04d}"
            batch.append(usage_in(tenant, period, charge, deployment))
            usage[(deployment, period)] += Decimal(charge)
        for _ in range(plans):
            deployment = rng.choice(deployments)
            # Some arrive after a later one: they must not supersede it.
            at = min(
                start + timedelta(seconds=rng.randint(0, 600)), clock.now().replace(microsecond=0)
            )
            usd = Decimal(f"{rng.randint(0, 2000)}.{rng.randint(0, 999):03d}")
            charge_id = f"pc-{next(tick):06d}"
            batch.append(
                period_charge(
                    tenant, period, str(usd), deployment=deployment, charge_id=charge_id, at=at
                )
            )
            known = charges.get((deployment, period))
            if known is None or (at, charge_id) > known[:2]:
                charges[(deployment, period)] = (at, charge_id, usd)
        await store(pool, batch)

    def expected() -> dict[tuple[str | None, str], int]:
        targets = {
            key: usd_to_cents(charges[key][2] if key in charges else usage.get(key, Decimal(0)))
            for key in usage.keys() | charges.keys()
        }
        return {key: cents for key, cents in targets.items() if cents}

    for round_, period in enumerate(months):
        await add(period, usage_events=12, plans=2)
        for earlier in months[:round_]:  # late usage and charges for closed months
            await add(earlier, usage_events=rng.randint(0, 3), plans=rng.randint(0, 2))
        await close_month(pool, period=period, now=clock.now())
        billed = await billed_per_month(pool, tenant)
        assert {k: v for k, v in billed.items() if v} == expected(), f"after closing {period}"
    await add(months[1], usage_events=2, plans=1)  # billed in the open current month
    await run_rollup(pool, period=month(0))
    billed = await billed_per_month(pool, tenant)
    assert {k: v for k, v in billed.items() if v} == expected()
    kinds = {r["kind"] for r in await pool.fetch("SELECT kind FROM invoice_lines")}
    assert kinds == {"llm_usage", "llm_usage_plan_true_up", "llm_usage_adjustment"}
