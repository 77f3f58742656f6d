"""`prices drift` and `prices preview` against a real PostgreSQL: events stored through the usage
consumer's own path, a stale price at the gateway found per pair, a matching one not, and a
month's lines repriced under today's table beside the billed ones, with nothing changed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from llm_usage.cli.main import run as cli_run
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.periods import current_period, month_start, next_month
from llm_usage.rollup.run import run_rollup
from llm_usage.storage.price_checks import period_drift
from tests import clock
from tests.integration.pipeline import encode, unique, usage_event
from tests.records import consumer_record

D = Decimal


async def _store(pool: asyncpg.Pool, events: Sequence[dict[str, Any]]) -> None:
    """Through the usage consumer's own handler, as the gateway's events arrive."""
    records = [consumer_record(encode(e), offset=n) for n, e in enumerate(events)]
    await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)


async def _add_price(
    pool: asyncpg.Pool, provider: str, model: str, since: datetime, **rates: str
) -> None:
    await pool.execute(
        "INSERT INTO prices (provider, model, effective_from, input, cached_input, output, "
        "reasoning, request_fee_usd, created_by) VALUES ($1, $2, $3, $4, $4, $5, $5, 0, 'test')",
        provider,
        model,
        since,
        D(rates["input"]),
        D(rates["output"]),
    )


def _event(
    tenant: str, provider: str, model: str, upstream: str, *, charge: str, deployment: str
) -> dict[str, Any]:
    return usage_event(
        tenant,
        provider=provider,
        model=model,
        deployment_id=deployment,
        input_tokens=1000,
        output_tokens=100,
        upstream_cost_usd=upstream,
        customer_charge_usd=charge,
    )


async def _month_with_a_stale_and_a_matching_pair(pool: asyncpg.Pool) -> str:
    """A tenant's events of this month: gpt-4o-mini's upstream cost at twice the table's list
    cost (the gateway's table is stale), claude's at exactly it, and a model without prices."""
    await clock.clear_of_midnight()
    now = clock.now()
    month_ago = now - timedelta(days=40)
    await _add_price(pool, "openai", "gpt-4o-mini", month_ago, input="0.15", output="0.60")
    await _add_price(pool, "anthropic", "claude", month_ago, input="3", output="15")
    # Not in effect yet: neither the check nor the preview may use it.
    await _add_price(
        pool, "anthropic", "claude", now + timedelta(days=1), input="300", output="1500"
    )
    tenant = unique("tenant")
    # List costs for 1000 input and 100 output tokens: 0.00021 (mini), 0.0045 (claude).
    await _store(
        pool,
        [
            *(
                _event(
                    tenant, "openai", "gpt-4o-mini", "0.00042", charge="0.0054", deployment="dep-1"
                )
                for _ in range(3)
            ),
            *(
                _event(tenant, "anthropic", "claude", "0.0045", charge="0.01", deployment="dep-2")
                for _ in range(2)
            ),
            _event(tenant, "acme", "mystery", "0.5", charge="0.02", deployment="dep-2"),
        ],
    )
    return tenant


async def test_drift_is_found_for_a_stale_pair_and_not_for_a_matching_one(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    tenant = await _month_with_a_stale_and_a_matching_pair(pool)
    other = unique("tenant")
    await _store(
        pool,
        [_event(other, "openai", "gpt-4o-mini", "0.00021", charge="0.0054", deployment="dep-1")],
    )
    first_day = month_start(clock.today())
    start, end = (datetime.combine(day, time(0), UTC) for day in (first_day, next_month(first_day)))
    async with pool.acquire() as connection, connection.transaction(readonly=True):
        pairs = await period_drift(connection, start=start, end=end, tenant_id=tenant)
        everyone = await period_drift(connection, start=start, end=end, tenant_id=None)
    by_pair = {(pair.provider, pair.model): pair for pair in pairs}
    mini = by_pair[("openai", "gpt-4o-mini")]
    assert (mini.compared, mini.beyond, mini.unpriced) == (3, 3, 0)
    assert (mini.upstream_usd, mini.list_usd, mini.difference_usd) == (
        D("0.00126"),
        D("0.00063"),
        D("0.00063"),
    )
    claude = by_pair[("anthropic", "claude")]
    assert (claude.compared, claude.beyond, claude.drifts) == (2, 0, False)
    assert claude.upstream_usd == claude.list_usd == D("0.009")
    mystery = by_pair[("acme", "mystery")]
    assert (mystery.compared, mystery.unpriced, mystery.unpriced_upstream_usd) == (0, 1, D("0.5"))
    everyone_mini = {(p.provider, p.model): p for p in everyone}[("openai", "gpt-4o-mini")]
    assert (everyone_mini.compared, everyone_mini.beyond) == (4, 3)


async def _cli(argv: list[str]) -> int:
    """The command line in a thread: it runs its own event loop."""
    return await asyncio.to_thread(cli_run, argv)


async def _contents(pool: asyncpg.Pool) -> dict[str, str]:
    """A digest of every table's rows: equal before and after means nothing changed."""
    tables = await pool.fetch(
        "SELECT c.oid::regclass::text AS name FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"
    )
    return {
        table["name"]: await pool.fetchval(
            "SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
            f"FROM {table['name']} t"
        )
        for table in tables
    }


async def test_the_commands_list_drift_and_preview_beside_the_billed_lines_changing_nothing(
    rollup_db: tuple[str, asyncpg.Pool],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, pool = rollup_db
    monkeypatch.setenv("DATABASE_URL", url)
    tenant = await _month_with_a_stale_and_a_matching_pair(pool)
    period = current_period(clock.now())
    billed = await run_rollup(pool, period=period, tenant_id=tenant)
    assert [(line.deployment_id, line.amount_cents) for line in billed.lines] == [
        ("dep-1", 2),
        ("dep-2", 4),
    ]
    before = await _contents(pool)
    assert len(before) > 10
    assert "prices" in before
    capsys.readouterr()

    assert await _cli(["prices", "drift", "--period", period, "--tenant", tenant, "--json"]) == 0
    drift = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["provider"], d["model"]) for d in drift] == [
        ("acme", "mystery"),
        ("openai", "gpt-4o-mini"),
    ]
    assert drift[1] == {
        "period": period,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "events_compared": 3,
        "events_beyond_tolerance": 3,
        "upstream_cost_usd": "0.00126",
        "list_cost_usd": "0.00063",
        "difference_usd": "0.00063",
        "events_unpriced": 0,
        "unpriced_upstream_cost_usd": "0",
    }
    assert await _cli(["prices", "drift", "--period", period, "--tenant", tenant, "--all"]) == 0
    text = capsys.readouterr().out
    assert "2 of 3 provider/model pairs" in text
    assert "claude" in text

    assert await _cli(["prices", "preview", "--period", period, "--tenant", tenant, "--json"]) == 0
    preview = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # dep-1: 3 x 0.0054 billed (2 cents), 3 x 0.00021 today (0 cents); dep-2: 2 x 0.01 + 0.02
    # billed (4 cents), 2 x 0.0045 today + the unpriced model's 0.02 kept (3 cents).
    assert [
        (
            p["deployment_id"],
            p["billed_cents"],
            p["preview_cents"],
            p["difference_cents"],
            p["preview_usd"],
        )
        for p in preview
    ] == [("dep-1", 2, 0, -2, "0.00063"), ("dep-2", 4, 3, -1, "0.029")]
    assert [(p["events"], p["events_kept_at_billed_charge"]) for p in preview] == [(3, 0), (3, 1)]
    assert await _cli(["prices", "preview", "--period", period]) == 0
    assert f"{tenant}  dep-2" in capsys.readouterr().out

    assert await _contents(pool) == before
    assert await _cli(["prices", "preview", "--period", "2026-13"]) == 2
