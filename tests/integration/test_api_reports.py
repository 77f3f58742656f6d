"""Every report of the API equals the same report computed here from the raw events.

Events go through the usage consumer's and the budget consumer's own handlers (the real paths
that keep the daily pre-aggregate and the spend counters); the expected answers are computed
in Python from `llm_usage_events` rows with exact decimals, never from an aggregate.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from llm_usage.api.params import parse_instant
from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.budgets import (
    BudgetWindow,
    Enforcement,
    ScopeType,
    budget_status,
    period_start,
)
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.domain.report_days import read_plan
from llm_usage.domain.usage import Usage
from llm_usage.rollup.lines import usage_lines
from llm_usage.rollup.run import run_rollup
from llm_usage.storage.budget_holds import place_check
from llm_usage.storage.budget_outbox import pending_alerts
from llm_usage.storage.budget_policies import set_policy
from llm_usage.storage.usage_dimensions import Dimension
from llm_usage.storage.usage_reports import SUMMARY_QUERY, breakdown_query
from tests import clock
from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import add_price, encode, unique, unpriced_event, usage_event
from tests.records import consumer_record

# The reports' "now": 24 November of last year, a fixed day inside the months every database
# keeps (RETENTION_MONTHS), whatever today is.
YEAR = clock.today().year - 1
NOW = datetime(YEAR, 11, 24, 12, 0, tzinfo=UTC)
DIMENSIONS = {
    "deployment": "deployment_id",
    "model": "model",
    "provider": "provider",
    "user": "user_id",
    "agent": "agent_id",
    "channel": "channel",
    "feature": "feature",
}


# The price of the events that send no charge (their charge is estimated), in effect before the
# earliest of them.
PRICED = ("reports-provider", "reports-model")


def _random_events(tenant: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Events from early October to now: some at exact UTC midnights, attributes often null,
    charges of every scale (and ties, so that the order of equal charges is tested too); one in
    five sends no charge, so the price table estimates it."""
    events = []
    for _ in range(count):
        if rng.random() < 0.1:
            moment = datetime.combine(NOW.date() - timedelta(days=rng.randrange(55)), time(0), UTC)
        else:
            moment = NOW - timedelta(seconds=rng.randrange(55 * 86400))
        charge = rng.choice(
            [
                "0",
                "0.5",
                "0.50",
                "1.25",
                str(Decimal(rng.randrange(10**6)).scaleb(-rng.randrange(9))),
            ]
        )
        event = usage_event(
            tenant,
            occurred_at=moment.isoformat().replace("+00:00", "Z"),
            customer_charge_usd=charge,
            input_tokens=rng.randrange(5000),
            output_tokens=rng.randrange(2000),
            cached_input_tokens=rng.randrange(500),
            reasoning_tokens=rng.randrange(300),
        )
        for field in DIMENSIONS.values():
            event[field] = rng.choice([None, f"{field}-a", f"{field}-b", f"{field}-c"])
        if rng.random() < 0.3:
            event["total_tokens"] = event["input_tokens"] + event["output_tokens"] + 7
        if rng.random() < 0.2:
            del event["customer_charge_usd"], event["customer_charge_cents"]
            event["provider"], event["model"] = PRICED
            # Priced tokens are parts of their kinds (cached of input, reasoning of output).
            event["cached_input_tokens"] = min(event["cached_input_tokens"], event["input_tokens"])
            event["reasoning_tokens"] = min(event["reasoning_tokens"], event["output_tokens"])
        events.append(event)
    return events


async def add_report_price(pool: asyncpg.Pool) -> None:
    """The price of PRICED, once per database (tests share it)."""
    if await pool.fetchval("SELECT count(*) FROM prices WHERE provider = $1", PRICED[0]) == 0:
        since = NOW - timedelta(days=400)
        await add_price(
            pool, *PRICED, effective_from=since, created_at=since, input="2.5", output="10.125"
        )


async def _store(pool: asyncpg.Pool, events: Sequence[dict[str, Any]]) -> None:
    await add_report_price(pool)
    records = [consumer_record(encode(e), offset=n) for n, e in enumerate(events)]
    for start in range(0, len(records), 100):
        batch = records[start : start + 100]
        await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(batch)
        await BudgetCounter(pool=pool, clock=lambda: NOW).record_batch(batch)


async def _raw(pool: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM llm_usage_events WHERE tenant_id = $1", tenant)


def _in(rows: Sequence[asyncpg.Record], start: datetime, end: datetime) -> list[asyncpg.Record]:
    return [row for row in rows if start <= row["occurred_at"] < end]


def _money(total: Decimal) -> str:
    return canonical_decimal(total)


def _summary(rows: Sequence[asyncpg.Record]) -> dict[str, Any]:
    counts = ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")
    return {
        "requests": len(rows),
        **{name: sum(row[name] for row in rows) for name in (*counts, "total_tokens")},
        "customer_charge_usd": _money(
            sum((row["customer_charge_usd"] for row in rows), Decimal(0))
        ),
        "estimated_charge_usd": _money(
            sum((row["customer_charge_usd"] for row in rows if row["charge_estimated"]), Decimal(0))
        ),
    }


def _breakdown(rows: Sequence[asyncpg.Record], column: str, limit: int) -> list[dict[str, Any]]:
    groups: dict[str | None, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        groups[row[column]].append(row)
    items = [{"key": key, **_summary(found)} for key, found in groups.items()]
    items.sort(
        key=lambda i: (
            -Decimal(i["customer_charge_usd"]),
            -i["requests"],
            i["key"] is not None,
            i["key"] or "",
        )
    )
    return items[:limit]


def _utc(text: str) -> str:
    return parse_instant(text).isoformat().replace("+00:00", "Z")


RANGES = [
    (None, None),  # this UTC month up to now
    (f"{YEAR}-10-01", f"{YEAR}-11-01"),  # whole days: the daily pre-aggregate where it applies
    (f"{YEAR}-10-15T00:00:00Z", f"{YEAR}-11-24T00:00:00+00:00"),
    (f"{YEAR}-10-03T06:30:00Z", f"{YEAR}-11-20T18:00:00+02:00"),  # partial days at both ends
    (f"{YEAR}-11-24T00:00:00.000001Z", f"{YEAR}-11-24T12:00:00Z"),
    (f"{YEAR}-11-05", f"{YEAR}-11-05"),  # empty
]


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> str:
    tenant, neighbour = unique("tenant"), unique("tenant")
    rng = random.Random(20261124)
    await _store(pool, _random_events(tenant, 600, rng) + _random_events(neighbour, 100, rng))
    return tenant


async def test_summary_and_breakdowns_equal_the_raw_events(pool: asyncpg.Pool, tenant: str) -> None:
    rows = await _raw(pool, tenant)
    assert len(rows) == 600
    headers = bearer(token("tenant-member", tenant))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        for start_text, end_text in RANGES:
            start = parse_instant(start_text) if start_text else NOW.replace(day=1, hour=0)
            end = parse_instant(end_text) if end_text else NOW
            query = {
                name: value
                for name, value in (("from", start_text), ("to", end_text))
                if value is not None
            }
            selected = _in(rows, start, end)
            answer = await client.get(
                f"/v1/tenants/{tenant}/usage/summary", params=query, headers=headers
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "tenant_id": tenant,
                "from": _utc(start_text) if start_text else f"{YEAR}-11-01T00:00:00Z",
                "to": _utc(end_text) if end_text else f"{YEAR}-11-24T12:00:00Z",
                **_summary(selected),
                "today": {
                    "from": f"{YEAR}-11-24T00:00:00Z",
                    "to": f"{YEAR}-11-24T12:00:00Z",
                    **_summary(_in(rows, datetime(YEAR, 11, 24, tzinfo=UTC), NOW)),
                },
            }
            for by, column in DIMENSIONS.items():
                for limit in (1000, 2):
                    answer = await client.get(
                        f"/v1/tenants/{tenant}/usage/breakdown",
                        params={**query, "by": by, "limit": str(limit)},
                        headers=headers,
                    )
                    assert answer.status_code == 200, answer.text
                    body = answer.json()
                    assert body["by"] == by
                    assert body["items"] == _breakdown(selected, column, limit), (by, query)


async def test_a_null_attribute_is_one_item_whose_key_is_null(
    pool: asyncpg.Pool, tenant: str
) -> None:
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{tenant}/usage/breakdown",
            params={"by": "agent", "from": f"{YEAR}-10-01"},
            headers=bearer(token("tenant-member", tenant)),
        )
    keys = [item["key"] for item in answer.json()["items"]]
    assert None in keys
    assert len(keys) == len(set(keys)) == 4


@pytest.mark.parametrize("days", [1, 30, 60])
async def test_daily_equals_the_raw_events_day_by_day(
    pool: asyncpg.Pool, tenant: str, days: int
) -> None:
    rows = await _raw(pool, tenant)
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{tenant}/usage/daily",
            params={"days": str(days)},
            headers=bearer(token("tenant-member", tenant)),
        )
    assert answer.status_code == 200, answer.text
    expected = []
    for back in range(days - 1, -1, -1):
        day = NOW.date() - timedelta(days=back)
        start = datetime.combine(day, time(0), UTC)
        selected = _in(rows, start, start + timedelta(days=1))
        expected.append(
            {
                "date": day.isoformat(),
                "requests": len(selected),
                "customer_charge_usd": _money(
                    sum((r["customer_charge_usd"] for r in selected), Decimal(0))
                ),
                "estimated_charge_usd": _money(
                    sum(
                        (r["customer_charge_usd"] for r in selected if r["charge_estimated"]),
                        Decimal(0),
                    )
                ),
            }
        )
    assert answer.json() == {"items": expected}
    assert answer.json()["items"][-1]["date"] == f"{YEAR}-11-24"


def _spend(rows: Sequence[asyncpg.Record], policy: BudgetPolicy, window: BudgetWindow) -> Decimal:
    column: Callable[[asyncpg.Record], str | None] = {
        ScopeType.TENANT: lambda r: r["tenant_id"],
        ScopeType.DEPLOYMENT: lambda r: r["deployment_id"],
        ScopeType.USER: lambda r: r["user_id"],
        ScopeType.AGENT: lambda r: r["agent_id"],
    }[policy.scope_type]
    start = period_start(window, NOW)
    return sum(
        (
            r["customer_charge_usd"]
            for r in rows
            if column(r) == policy.scope_id and period_start(window, r["occurred_at"]) == start
        ),
        Decimal(0),
    )


async def test_budgets_and_alerts_equal_the_raw_events(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    policies = [
        BudgetPolicy(tenant, ScopeType.TENANT, tenant, monthly_limit_usd=Decimal("5")),
        BudgetPolicy(
            tenant, ScopeType.DEPLOYMENT, "deployment_id-a", Decimal("0.3"), Decimal("1e6"), 50
        ),
        BudgetPolicy(
            tenant, ScopeType.USER, "user_id-b", Decimal("1000"), enforcement=Enforcement.BLOCK
        ),
        BudgetPolicy(tenant, ScopeType.AGENT, "nobody", daily_limit_usd=Decimal("3")),
    ]
    async with pool.acquire() as connection:
        for policy in policies:
            await set_policy(connection, policy, actor="test")
    await _store(pool, _random_events(tenant, 300, random.Random(7)))
    rows = await _raw(pool, tenant)
    # Open holds of two budget checks (deployment, user, amount), on NOW's day and month.
    checks = [("deployment_id-a", None, Decimal("0.25")), (None, "user_id-b", Decimal("0.5"))]
    async with pool.acquire() as connection:
        for index, (deployment, user, amount) in enumerate(checks):
            outcome = await place_check(
                connection,
                tenant_id=tenant,
                gateway_request_id=unique("check"),
                deployment_id=deployment,
                user_id=user,
                agent_id=None,
                amount_usd=amount,
                now=NOW,
                hold_seconds=300,
            )
            assert outcome.decision == "allow", (index, outcome)

    def held(policy: BudgetPolicy) -> Decimal:
        def scope_id(deployment: str | None, user: str | None) -> str | None:
            return {
                ScopeType.TENANT: tenant,
                ScopeType.DEPLOYMENT: deployment,
                ScopeType.USER: user,
                ScopeType.AGENT: None,
            }[policy.scope_type]

        return sum(
            (amount for d, u, amount in checks if scope_id(d, u) == policy.scope_id), Decimal(0)
        )

    expected = [
        budget_status(
            scope_type=policy.scope_type,
            scope_id=policy.scope_id,
            window=window,
            period_start=period_start(window, NOW),
            spend_usd=_spend(rows, policy, window),
            limit_usd=limit,
            warn_threshold_pct=policy.warn_threshold_pct,
            held_usd=held(policy),
            enforcement=policy.enforcement,
        ).to_json()
        for policy in policies
        for window, limit in policy.limits()
    ]
    assert {status["level"] for status in expected} >= {"ok", "exceeded"}
    assert {status["held_usd"] for status in expected} == {"0", "0.25", "0.5", "0.75"}

    # Alerts decided by the budget consumer are emitted once the relay has published them.
    async with pool.acquire() as connection:
        pending = [
            a for a in await pending_alerts(connection, limit=10_000) if a.tenant_id == tenant
        ]
        # As the relay marks what the alerts topic acknowledged; the last one is not yet.
        await connection.execute(
            "UPDATE budget_alert_outbox SET published_at = now() WHERE alert_id = ANY($1)",
            [a.alert_id for a in pending[:-1]],
        )
    published = sorted(pending[:-1], key=lambda a: (a.created_at, a.seq), reverse=True)
    assert len(published) >= 2

    headers = bearer(token("tenant-member", tenant))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(f"/v1/tenants/{tenant}/budgets", headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"items": expected}

        answer = await client.get(f"/v1/tenants/{tenant}/alerts", headers=headers)
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        assert [item["alert_id"] for item in items] == [a.alert_id for a in published]
        # Each exactly as on the alerts topic: the outbox's bytes, parsed.
        assert items == [json.loads(a.payload) for a in published]

        later = published[0].created_at + timedelta(microseconds=1)
        answer = await client.get(
            f"/v1/tenants/{tenant}/alerts",
            params={"since": later.isoformat()},
            headers=headers,
        )
        assert answer.json() == {"items": []}
        answer = await client.get(
            f"/v1/tenants/{tenant}/alerts", params={"limit": "1"}, headers=headers
        )
        assert [item["alert_id"] for item in answer.json()["items"]] == [published[0].alert_id]


async def test_invoice_lines_equal_the_lines_built_from_the_raw_events(
    pool: asyncpg.Pool, tenant: str
) -> None:
    await run_rollup(pool, period=f"{YEAR}-10", tenant_id=tenant)
    rows = await _raw(pool, tenant)
    october = _in(rows, datetime(YEAR, 10, 1, tzinfo=UTC), datetime(YEAR, 11, 1, tzinfo=UTC))
    by_deployment: dict[str | None, Usage] = defaultdict(Usage)
    for row in october:
        estimated = row["customer_charge_usd"] if row["charge_estimated"] else Decimal(0)
        by_deployment[row["deployment_id"]] += Usage(
            row["customer_charge_usd"], row["input_tokens"], row["output_tokens"], 1, estimated
        )
    expected = [line.as_json() for line in usage_lines(tenant, f"{YEAR}-10", by_deployment)]
    assert expected

    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{tenant}/invoice-lines",
            params={"period": f"{YEAR}-10"},
            headers=bearer(token("tenant-admin", tenant)),
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["period"] == f"{YEAR}-10"
        assert body["closed"] is False

        def order(line: dict[str, Any]) -> tuple[bool, str]:
            return line["deployment_id"] is not None, line["deployment_id"] or ""

        assert sorted(body["items"], key=order) == sorted(expected, key=order)
        assert all(isinstance(line["amount_cents"], int) for line in body["items"])

        answer = await client.get(
            f"/v1/tenants/{tenant}/invoice-lines",
            params={"period": f"{YEAR}-09"},
            headers=bearer(token("platform-admin")),
        )
        assert answer.json() == {"period": f"{YEAR}-09", "closed": False, "items": []}


async def test_equal_charges_are_ordered_by_requests_then_key_null_first(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    at = f"{YEAR}-11-20T10:00:00Z"
    spec = [("z", "2"), ("x", "1"), (None, "1"), ("w", "1.00"), ("v", "0.5"), ("v", "0.5")]
    await _store(
        pool,
        [usage_event(tenant, channel=c, customer_charge_usd=u, occurred_at=at) for c, u in spec],
    )
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{tenant}/usage/breakdown",
            params={"by": "channel"},
            headers=bearer(token("tenant-member", tenant)),
        )
    items = answer.json()["items"]
    assert [(i["key"], i["requests"], i["customer_charge_usd"]) for i in items] == [
        ("z", 1, "2"),
        ("v", 2, "1"),
        (None, 1, "1"),
        ("w", 1, "1"),
        ("x", 1, "1"),
    ]


@pytest.mark.parametrize("by", [None, *Dimension])
async def test_reports_read_the_aggregate_and_raw_edges_from_indexes_alone(
    pool: asyncpg.Pool, by: Dimension | None
) -> None:
    """Every column a report reads of the raw events is in the covering index, and the
    aggregate is read through its key: a column added to a query but not to the index would
    make each event cost a heap page again."""
    query = SUMMARY_QUERY if by is None else breakdown_query(by)
    start, end = NOW - timedelta(days=30, hours=3), NOW + timedelta(hours=1)
    plan = read_plan(start, end, now=NOW)
    assert len(plan.raw) == 2  # both edges cut a day: both raw pieces are read
    pieces = [value for p in plan.raw for value in (p.start, p.end, p.sign)]
    async with pool.acquire() as connection, connection.transaction():
        # Forbid the other plans, so that the plan shows what the indexes can do on their own.
        # On Citus the shards' plans are made on the workers: the settings must travel there
        # (on one PostgreSQL this is a placeholder setting that nothing reads).
        await connection.execute("SET LOCAL citus.propagate_set_commands = 'local'")
        await connection.execute("SET LOCAL enable_seqscan = off")
        await connection.execute("SET LOCAL enable_bitmapscan = off")
        explained = await connection.fetchval(
            f"EXPLAIN (FORMAT JSON) {query}",
            "t",
            (by or Dimension.DEPLOYMENT).value,
            plan.first_day,
            plan.end_day,
            *pieces,
            *([10] if by else []),
        )
    text = str(explained)  # EXPLAIN's JSON, as text
    assert text.count('"Index Only Scan"') == 2, text
    # On Citus the one shard's index: the same name with the shard's number after it.
    assert '"Index Name": "usage_daily_dimensions_key' in text, text
    assert '"Seq Scan"' not in text, text


async def _explain_summary(pool: asyncpg.Pool, tenant: str, start: datetime, end: datetime) -> str:
    plan = read_plan(start, end, now=NOW)
    pieces = [value for p in plan.raw for value in (p.start, p.end, p.sign)]
    rows = await pool.fetch(
        f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {SUMMARY_QUERY}",
        tenant,
        Dimension.DEPLOYMENT.value,
        plan.first_day,
        plan.end_day,
        *pieces,
    )
    return "\n".join(row[0] for row in rows)


def _estimated_scans(text: str) -> list[str]:
    """The plan's lines of the estimated branches' scans: the only reads of raw events that
    are not index-only (they need `charge_estimated`, which the covering index lacks)."""
    return [
        line
        for line in text.splitlines()
        if "Index Scan using" in line and "llm_usage_events" in line
    ]


async def test_the_estimated_branches_run_only_on_days_with_an_estimated_charge(
    pool: asyncpg.Pool,
) -> None:
    """Without an estimated charge on a cut day, its estimated branch is never executed (the
    one-time filter reads the day's aggregate row, not its events); with one, it is, and the
    sums stay exact."""
    tenant = unique("tenant")
    start, end = NOW - timedelta(days=30, hours=3), NOW + timedelta(hours=1)
    plan = read_plan(start, end, now=NOW)
    assert len(plan.raw) == 2  # both edges cut a day
    first_cut = plan.raw[0].start
    charged = [first_cut + timedelta(hours=1), start + timedelta(hours=1), NOW - timedelta(hours=1)]
    await _store(pool, [usage_event(tenant, occurred_at=clock.iso(at)) for at in charged])
    text = await _explain_summary(pool, tenant, start, end)
    scans = _estimated_scans(text)
    assert len(scans) == 2, text
    assert all("(never executed)" in line for line in scans), text

    # Estimated charges on the first cut day, inside the range and in its raw piece outside it.
    await _store(
        pool,
        [
            unpriced_event(tenant, *PRICED, occurred_at=clock.iso(at))
            for at in (first_cut + timedelta(minutes=30), start + timedelta(minutes=30))
        ],
    )
    text = await _explain_summary(pool, tenant, start, end)
    first, second = _estimated_scans(text)
    assert "(never executed)" not in first, text
    assert "(never executed)" in second, text  # the last day has none still

    rows = await _raw(pool, tenant)
    assert sum(row["charge_estimated"] for row in rows) == 2
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{tenant}/usage/summary",
            params={"from": clock.iso(start), "to": clock.iso(end)},
            headers=bearer(token("tenant-member", tenant)),
        )
    body = answer.json()
    expected = _summary(_in(rows, start, end))
    assert Decimal(expected["estimated_charge_usd"]) > 0
    assert {name: body[name] for name in expected} == expected
