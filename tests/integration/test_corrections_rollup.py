"""Corrections of closed months, billed through the rollup's adjustment path: whatever sequence of
voids and amends arrives, the lines billing a month add up to round_half_up(its exact effective
total x 100), each adjustment names the corrections it trues up, and closing the month that bills
them stamps them billed."""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any

import asyncpg
import pytest

from llm_usage.core.settings import Settings
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.periods import add_months, period_of
from llm_usage.rollup.reconcile import reconcile
from llm_usage.rollup.run import close_month, run_rollup
from tests import clock
from tests.integration.pipeline import unique, usage_event
from tests.integration.test_corrections_usage import correction, land

DEPLOYMENTS = ("dep-a", "dep-b", None)


async def billed_cents(pool: asyncpg.Pool, tenant: str) -> dict[tuple[str, str | None], int]:
    """Cents of every stored line (closed, and the open month's preview) by the month it bills."""
    rows = await pool.fetch(
        "SELECT original_period, deployment_id, sum(amount_cents) AS cents FROM invoice_lines "
        "WHERE tenant_id = $1 GROUP BY 1, 2",
        tenant,
    )
    return {(row["original_period"], row["deployment_id"]): row["cents"] for row in rows}


async def effective_cents(
    pool: asyncpg.Pool, tenant: str, months: list[date]
) -> dict[tuple[str, str | None], int]:
    """round_half_up(exact effective total x 100) per month and deployment: what must be billed."""
    rows = await pool.fetch(
        "SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month, "
        "deployment_id, sum(customer_charge_usd) AS total FROM llm_usage_events_effective "
        "WHERE tenant_id = $1 AND NOT voided GROUP BY 1, 2",
        tenant,
    )
    expected = {(period_of(row["month"]), row["deployment_id"]): 0 for row in rows}
    expected.update(
        {(period_of(m), d): 0 for m in months for d in DEPLOYMENTS}
    )  # every group billed before may have been voided to nothing
    for row in rows:
        expected[(period_of(row["month"]), row["deployment_id"])] = usd_to_cents(row["total"])
    return expected


async def assert_billed_at_exact_totals(
    pool: asyncpg.Pool, tenant: str, months: list[date]
) -> None:
    billed = await billed_cents(pool, tenant)
    expected = await effective_cents(pool, tenant, months)
    assert set(billed) <= set(expected)
    assert {key: billed.get(key, 0) for key in expected} == expected


def random_correction(rng: random.Random, event: dict[str, Any], step: int) -> dict[str, Any]:
    after = timedelta(seconds=rng.randint(0, 30))  # out of order: later ones may rank lower
    if rng.random() < 0.3:
        return correction(event, "void", after=after)
    fields: dict[str, Any] = {"customer_charge_usd": f"{rng.randint(0, 40_000) / 10_000:.4f}"}
    if rng.random() < 0.5:
        fields["deployment_id"] = rng.choice(DEPLOYMENTS)
    if rng.random() < 0.3:
        fields["input_tokens"] = rng.randint(0, 5000)
    return correction(event, fields=fields, after=after, correction_id=f"c-{step:03d}")


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_corrections_of_closed_months_keep_every_month_billed_at_its_exact_total(
    rollup_db: tuple[str, asyncpg.Pool], seed: int
) -> None:
    url, pool = rollup_db
    await clock.clear_of_midnight()
    rng = random.Random(seed)
    tenant = unique("tenant")
    this_month = clock.this_month()
    months = [add_months(this_month, -3), add_months(this_month, -2)]
    billing_month = period_of(add_months(this_month, -1))
    events = [
        usage_event(
            tenant,
            deployment_id=rng.choice(DEPLOYMENTS),
            customer_charge_usd=f"{rng.randint(1, 30_000) / 10_000:.4f}",
            occurred_at=f"{month + timedelta(days=rng.randint(0, 27))}T12:00:00Z",
        )
        for month in months
        for _ in range(4)
    ]
    await land(pool, *events)
    for month in months:
        await close_month(pool, period=period_of(month), now=clock.now())

    # Corrections arrive while the billing month is open: its runs true both months up or down.
    first = [random_correction(rng, rng.choice(events), step) for step in range(8)]
    for batch in (first[:3], first[3:]):
        await land(pool, *batch)
        await run_rollup(pool, period=billing_month)
    await assert_billed_at_exact_totals(pool, tenant, months)
    named = {
        cid
        for line in (await run_rollup(pool, period=billing_month)).lines
        if line.tenant_id == tenant
        for cid in line.meta.get("correction_ids", [])
    }
    applied = {
        row["correction_id"]
        for row in await pool.fetch(
            "SELECT correction_id FROM usage_corrections WHERE tenant_id = $1 AND late", tenant
        )
    }
    assert named <= applied
    assert named, "at least one adjustment names its corrections"

    # Closing the billing month stamps every late correction it considered (a superseded one
    # moved nothing: it is not late, and no line bills it).
    await close_month(pool, period=billing_month, now=clock.now())
    stamped = await pool.fetch(
        "SELECT late, won, billed_in FROM usage_corrections WHERE tenant_id = $1", tenant
    )
    assert {row["billed_in"] for row in stamped if row["late"]} == {billing_month}
    assert {(row["won"], row["billed_in"]) for row in stamped if not row["late"]} <= {(False, None)}

    # Later corrections are billed by the current month, named alone.
    later = [random_correction(rng, rng.choice(events), step) for step in range(100, 104)]
    await land(pool, *later)
    preview = await run_rollup(pool, period=period_of(this_month))
    for line in preview.lines:
        if line.tenant_id == tenant:
            assert set(line.meta.get("correction_ids", [])) <= {c["correction_id"] for c in later}
    await assert_billed_at_exact_totals(pool, tenant, months)
    # And reconcile, recomputing every month from the effective events, finds nothing to say.
    report = await reconcile(
        pool,
        Settings(database_url=url),
        periods=[*map(period_of, months), billing_month, period_of(this_month)],
        tenant_id=tenant,
        confirm_seconds=0,
        read_topic=False,
    )
    assert report.drifts == [], [drift.text() for drift in report.drifts]
