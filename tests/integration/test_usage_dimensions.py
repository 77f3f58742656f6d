"""The reports read from the aggregate equal the same reports computed from raw events.

Random events go through the real usage consumer's handler (exact and conflicting duplicates,
late events of earlier days and months, two replicas landing overlapping batches at once);
then every report, over ranges that cut days at random instants, is compared with SQL over
`llm_usage_events` written here, which never reads an aggregate.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.periods import start_of_month, utc_day
from llm_usage.domain.report_days import midnight
from llm_usage.storage.usage_dimensions import Dimension, fill_from_events
from llm_usage.storage.usage_reports import usage_breakdown, usage_daily, usage_summary
from tests import clock
from tests.integration.pipeline import add_price, unique, unpriced_event, usage_event
from tests.records import consumer_record

NOW = clock.now()
SPAN = timedelta(days=70)  # back into an earlier month: late events, closed or not

_values = st.sampled_from([None, "a", "b", "c"])
_event = st.fixed_dictionaries(
    {
        "tenant": st.sampled_from(["t1", "t2"]),
        # Up to 4 minutes ahead (the contract allows 5), or back into an earlier month; some
        # at a UTC midnight exactly.
        "at": st.one_of(
            st.integers(-240 * 10**6, int(SPAN.total_seconds()) * 10**6).map(
                lambda us: NOW - timedelta(microseconds=us)
            ),
            st.integers(0, SPAN.days).map(lambda d: midnight(utc_day(NOW) - timedelta(days=d))),
        ),
        "attributes": st.tuples(*[_values] * 7),
        "input_tokens": st.integers(0, 5000),
        "output_tokens": st.integers(0, 2000),
        "cached_input_tokens": st.integers(0, 100),
        "reasoning_tokens": st.integers(0, 100),
        "charge": st.decimals(min_value=0, max_value=1000, places=9, allow_nan=False),
        # No charge sent: the price table estimates it (the model is then never null).
        "estimated": st.booleans(),
    }
)
# After the first copies: 'same' re-sends an earlier event, 'conflict' changes its tokens.
_copies = st.lists(st.tuples(st.sampled_from(["same", "conflict"]), st.integers(0, 10**6)))
_instants = st.integers(0, int(SPAN.total_seconds() * 10**6)).map(
    lambda us: NOW - SPAN + timedelta(microseconds=us)
)


# The price rows of a run's estimated events: its own provider, these models, each priced
# from before the earliest event (an earlier and a later row, so that events are priced by both).
_MODELS = ("a", "b", "c")
_PRICES = (("1.25", "10", "0.125", "40"), ("3", "15.000001", None, None))


def _usage_event(run: str, spec: dict[str, Any]) -> dict[str, Any]:
    fields = dict(zip((d.column for d in Dimension), spec["attributes"], strict=True))
    tenant = f"{run}-{spec['tenant']}"
    tokens = {
        "occurred_at": spec["at"].isoformat(),
        "input_tokens": spec["input_tokens"] + spec["cached_input_tokens"],
        "output_tokens": spec["output_tokens"] + spec["reasoning_tokens"],
        "cached_input_tokens": spec["cached_input_tokens"],
        "reasoning_tokens": spec["reasoning_tokens"],
    }
    if spec["estimated"]:
        del fields["provider"], fields["model"]
        model = spec["attributes"][[d.column for d in Dimension].index("model")] or "a"
        return unpriced_event(tenant, run, model, **tokens, **fields)
    return usage_event(tenant, customer_charge_usd=str(spec["charge"]), **tokens, **fields)


async def _add_run_prices(pool: asyncpg.Pool, run: str) -> None:
    first = NOW - SPAN - timedelta(days=1)
    for model in _MODELS:
        for days, (input, output, cached, reasoning) in zip(
            (0, SPAN.days // 2), _PRICES, strict=True
        ):
            since = first + timedelta(days=days)
            await add_price(
                pool,
                run,
                model,
                effective_from=since,
                created_at=first,
                input=input,
                output=output,
                cached_input=cached,
                reasoning=reasoning,
            )


def _records(events: list[dict[str, Any]]) -> list[Any]:
    return [
        consumer_record(json.dumps(e).encode(), offset=n, key=None) for n, e in enumerate(events)
    ]


_FIGURES = """
    count(*)::bigint AS requests,
    coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
    coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
    coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens,
    coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens,
    coalesce(sum(total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(customer_charge_usd), 0) AS customer_charge_usd,
    coalesce(sum(customer_charge_usd) FILTER (WHERE charge_estimated), 0) AS estimated_charge_usd
"""
_RAW_WHERE = "WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3"


async def _raw_summary(pool: asyncpg.Pool, tenant: str, start: datetime, end: datetime) -> Any:
    row = await pool.fetchrow(
        f"SELECT {_FIGURES} FROM llm_usage_events {_RAW_WHERE}", tenant, start, end
    )
    assert row is not None  # an aggregate without GROUP BY always answers one row
    return dict(row)


async def _raw_breakdown(
    pool: asyncpg.Pool, tenant: str, by: Dimension, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"""SELECT {by.column} AS key, {_FIGURES} FROM llm_usage_events {_RAW_WHERE}
            GROUP BY {by.column}
            ORDER BY customer_charge_usd DESC, requests DESC, key ASC NULLS FIRST""",
        tenant,
        start,
        end,
    )
    return [dict(row) for row in rows]


async def _raw_daily(pool: asyncpg.Pool, tenant: str) -> dict[Any, tuple[int, Decimal, Decimal]]:
    rows = await pool.fetch(
        """SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, count(*) AS requests,
                  sum(customer_charge_usd) AS charge,
                  coalesce(sum(customer_charge_usd) FILTER (WHERE charge_estimated), 0)
                      AS estimated
           FROM llm_usage_events WHERE tenant_id = $1 GROUP BY 1""",
        tenant,
    )
    return {row["day"]: (row["requests"], row["charge"], row["estimated"]) for row in rows}


async def _assert_reports_equal_raw(
    pool: asyncpg.Pool, tenant: str, ranges: list[tuple[datetime, datetime]]
) -> None:
    async with pool.acquire() as connection:
        for start, end in ranges:
            summary = await usage_summary(connection, tenant, start=start, end=end, now=NOW)
            assert summary.__dict__ == await _raw_summary(pool, tenant, start, end), (start, end)
            for by in Dimension:
                items = await usage_breakdown(
                    connection, tenant, by=by, start=start, end=end, now=NOW, limit=1000
                )
                expected = await _raw_breakdown(pool, tenant, by, start, end)
                assert [item.__dict__ for item in items] == expected, (by, start, end)
        first_day = utc_day(NOW - SPAN)
        daily = await usage_daily(connection, tenant, first_day=first_day, last_day=utc_day(NOW))
    raw = await _raw_daily(pool, tenant)
    assert len(daily) == (utc_day(NOW) - first_day).days + 1
    for item in daily:
        figures = (item.requests, item.customer_charge_usd, item.estimated_charge_usd)
        assert figures == raw.get(item.day, (0, Decimal(0), Decimal(0)))
    assert sum(item.requests for item in daily) == sum(r for r, _, _ in raw.values())


@settings(
    max_examples=25,
    deadline=None,
    # Each example has tenants of its own in the session's database.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(_event, min_size=1, max_size=40),
    copies=_copies,
    cuts=st.lists(st.tuples(_instants, _instants), max_size=3),
    split=st.integers(0, 10**6),
    overlap=st.integers(0, 10),
)
async def test_every_report_equals_the_raw_events_after_duplicates_late_events_and_replicas(
    pool: asyncpg.Pool,
    *,
    specs: list[dict[str, Any]],
    copies: list[tuple[str, int]],
    cuts: list[tuple[datetime, datetime]],
    split: int,
    overlap: int,
) -> None:
    run = unique("dims")
    await _add_run_prices(pool, run)
    events = [_usage_event(run, spec) for spec in specs]
    for kind, pick in copies:
        original = events[pick % len(events)]
        events.append(
            original
            if kind == "same"
            else {**original, "output_tokens": original["output_tokens"] + 1}
        )
    # Two replicas land overlapping batches at once, then one lands the rest (redelivered).
    cut = split % (len(events) + 1)
    first, second = events[: cut + overlap], events[max(cut - overlap, 0) :]
    replicas = [UsageRecorder(pool=pool, clock=lambda: NOW) for _ in range(2)]
    landed = await asyncio.gather(
        replicas[0].record_batch(_records(first)),
        replicas[1].record_batch(_records(second)),
        return_exceptions=True,
    )
    for batch, outcome in zip((first, second), landed, strict=True):
        if isinstance(outcome, BaseException):
            # On Citus the two COPYs into the id window can deadlock across shards (40P01 or, from
            # a worker, XX000); the loser's transaction rolls back whole and its batch is
            # delivered again.
            if "deadlock" not in str(outcome):
                raise outcome
            await replicas[0].record_batch(_records(batch))
    await replicas[1].record_batch(_records(events[::2]))

    ranges = [
        (start_of_month(NOW), NOW),
        (midnight(utc_day(NOW)), NOW),
        (NOW - SPAN, NOW + timedelta(minutes=5)),
        *((min(a, b), max(a, b)) for a, b in cuts),
    ]
    for tenant in (f"{run}-t1", f"{run}-t2"):
        await _assert_reports_equal_raw(pool, tenant, ranges)
    # Every event was stored (none dead-lettered unpriced), the estimated ones as such.
    stored = await pool.fetch(
        "SELECT charge_estimated, price_effective_from FROM llm_usage_events "
        "WHERE tenant_id = ANY($1::text[])",
        [f"{run}-t1", f"{run}-t2"],
    )
    assert len(stored) == len({event["gateway_request_id"] for event in events})
    assert sum(row["charge_estimated"] for row in stored) == sum(s["estimated"] for s in specs)
    assert all(
        row["charge_estimated"] == (row["price_effective_from"] is not None) for row in stored
    )


async def test_the_fill_sets_the_aggregate_to_the_stored_events(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    events = [
        usage_event(tenant, model=model, occurred_at=clock.iso(NOW - timedelta(days=days)))
        for days, model in ((0, "m1"), (0, None), (3, "m1"), (40, "m2"))
    ]
    await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(_records(events))
    before = await pool.fetch(
        "SELECT * FROM usage_daily_dimensions WHERE tenant_id = $1 ORDER BY 1, 2, 3, 4", tenant
    )
    assert len(before) == 7 * 3 + 1  # seven dimensions on three days, two models today
    # As the API benchmark's loader: the aggregate's rows lost, the events kept.
    await pool.execute(
        "UPDATE usage_daily_dimensions SET requests = 0, charge_usd = 0 WHERE tenant_id = $1",
        tenant,
    )
    async with pool.acquire() as connection:
        await fill_from_events(connection, tenant_ids=[tenant])
        await fill_from_events(connection, tenant_ids=[tenant])  # again: the same rows
    after = await pool.fetch(
        "SELECT * FROM usage_daily_dimensions WHERE tenant_id = $1 ORDER BY 1, 2, 3, 4", tenant
    )
    assert after == before
    ranges = [(NOW - SPAN, NOW + timedelta(minutes=5)), (start_of_month(NOW), NOW)]
    await _assert_reports_equal_raw(pool, tenant, ranges)
