"""Corrections through the budget consumer (design §6): counters move by the exact difference a
correction makes, once; a move up alerts like an event (each level once, ever), a move down
alerts nothing; the consumer follows the usage consumer's verdict, waiting for it and for the
event's count. Real Kafka and PostgreSQL; the handler in-process where a batch's outcome is
asserted, the real `llm-usage consume budget` process for the waits and the alerts topic.

The usage consumer's part is played by hand: its handler stores the events, and each test writes
the `usage_corrections` verdict the usage consumer would write.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.budgets import budget_horizon
from llm_usage.domain.corrections import Correction
from llm_usage.domain.periods import period_of, utc_day
from llm_usage.runtime.correction_metrics import CORRECTION_RESULTS, correction_metrics
from llm_usage.runtime.handler import Record
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.storage.budget_corrections import WindowEvent, window_events
from llm_usage.storage.budget_spend import ChargeMove, add_to_counters
from tests import clock
from tests.integration import test_budget_consumer
from tests.integration.pipeline import (
    PipelineTopics,
    assert_reconciled,
    encode,
    produce,
    spawn_consumer,
    unique,
    usage_event,
    wait_until,
)
from tests.integration.test_budget_consumer import (
    alerts_on,
    budget_env,
    run_until_idle,
    set_policy,
)
from tests.records import consumer_record

_counter = iter(range(10**9))


def records(*values: dict[str, Any]) -> list[Record]:
    """Records of these events or corrections, keyed by their tenant, at fresh offsets."""
    return [
        consumer_record(encode(v), offset=next(_counter), key=v["tenant_id"].encode())
        for v in values
    ]


def correction(
    event: dict[str, Any], action: str = "amend", *, minutes: int = 0, **fields: Any
) -> dict[str, Any]:
    """A correction of `event`, decided `minutes` after a common instant of today."""
    at = clock.earlier_today() - timedelta(minutes=10 - minutes)
    return {
        "event_type": "llm_usage_corrected",
        "correction_id": unique("c"),
        "gateway_request_id": event["gateway_request_id"],
        "tenant_id": event["tenant_id"],
        "action": action,
        **({"fields": fields} if action == "amend" else {}),
        "reason": "test",
        "actor": "ops@example.com",
        "occurred_at": clock.iso(at),
        "event_occurred_at": event["occurred_at"],
    }


async def judge(pool: asyncpg.Pool, sent: dict[str, Any], verdict: str = "applied") -> None:
    """The verdict the usage consumer would store for this correction."""
    decoded = decode_usage_topic_record(encode(sent), now=clock.now())
    assert isinstance(decoded, Correction), decoded
    await pool.execute(
        "INSERT INTO usage_corrections (tenant_id, correction_id, gateway_request_id, action, "
        "fields, reason, actor, occurred_at, event_occurred_at, verdict) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        decoded.tenant_id,
        decoded.correction_id,
        decoded.gateway_request_id,
        decoded.action.value,
        json.dumps(decoded.fields_json()),
        decoded.reason,
        decoded.actor,
        decoded.occurred_at,
        decoded.event_occurred_at if verdict == "applied" else None,
        verdict,
    )


async def store(pool: asyncpg.Pool, *events: dict[str, Any]) -> None:
    """Store the events as the usage consumer does (the table and the id window, not counted)."""
    outcome = await UsageRecorder(pool=pool, clock=clock.now).record_batch(records(*events))
    assert +outcome.counts == {"recorded": len(events)}, outcome


async def counters(pool: asyncpg.Pool, tenant: str) -> dict[tuple[str, str, str, date], Decimal]:
    rows = await pool.fetch(
        'SELECT scope_type, scope_id, "window", period_start, spend_usd FROM budget_spend '
        "WHERE tenant_id = $1 AND spend_usd <> 0",
        tenant,
    )
    return {(r[0], r[1], r[2], r[3]): r[4] for r in rows}


def expected(
    at: datetime, spend: dict[tuple[str, str], str]
) -> dict[tuple[str, str, str, date], Decimal]:
    """Each (scope type, scope id)'s spend in `at`'s UTC day and month."""
    day, month = at.date(), clock.month_of(at)
    return {
        (scope, scope_id, window, start): Decimal(amount)
        for (scope, scope_id), amount in spend.items()
        for window, start in (("daily", day), ("monthly", month))
        if Decimal(amount)
    }


def budget(pool: asyncpg.Pool, registry: CollectorRegistry | None = None) -> BudgetCounter:
    metrics = correction_metrics(registry, "budget") if registry else None
    return BudgetCounter(pool=pool, clock=clock.now, corrections=metrics)


def results(registry: CollectorRegistry) -> dict[str, float]:
    """llm_usage_corrections_total{consumer="budget"} by result, those above 0."""
    found = {}
    for result in CORRECTION_RESULTS:
        labels = {"consumer": "budget", "result": result}
        if value := registry.get_sample_value("llm_usage_corrections_total", labels):
            found[result] = value
    return found


async def test_counters_move_by_the_exact_difference_once(pool: asyncpg.Pool) -> None:
    await clock.clear_of_midnight()
    tenant = unique("tenant")
    at = clock.earlier_today()
    voided, lowered, raised, moved = [
        usage_event(tenant, customer_charge_usd=charge, occurred_at=clock.iso(at))
        for charge in ("0.50", "0.30", "0.20", "0.10")
    ]
    await store(pool, voided, lowered, raised, moved)
    assert +(await budget(pool).record_batch(records(voided, lowered, raised, moved))).counts == {
        "recorded": 4
    }
    sent = [
        correction(voided, "void"),
        correction(lowered, minutes=2, customer_charge_usd="0.000000000000000001"),
        # older than the one before it: history only, the counters keep the later one's values
        correction(lowered, minutes=1, customer_charge_usd="9"),
        correction(raised, customer_charge_usd="1.00"),
        correction(moved, deployment_id="dep-2", user_id=None, agent_id="agent-7"),
    ]
    for one in sent:
        await judge(pool, one)

    registry = CollectorRegistry()
    outcome = await budget(pool, registry).record_batch(records(*sent))

    assert +outcome.counts == {"recorded": 5}
    assert results(registry) == {"applied": 4, "superseded": 1}
    lowered_to, raised_to = Decimal("0.000000000000000001"), Decimal("1.00")
    dep_1 = str(lowered_to + raised_to)
    assert await counters(pool, tenant) == expected(
        at,
        {
            ("tenant", tenant): str(lowered_to + raised_to + Decimal("0.10")),
            ("deployment", "dep-1"): dep_1,
            ("user", "user-1"): dep_1,
            ("deployment", "dep-2"): "0.10",
            ("agent", "agent-7"): "0.10",
        },
    )
    applied = await pool.fetch(
        "SELECT correction_id FROM budget_corrections WHERE tenant_id = $1", tenant
    )
    assert {r[0] for r in applied} == {c["correction_id"] for c in sent}

    # Every copy again (a replay), and the events again: nothing moves.
    before = await counters(pool, tenant)
    registry = CollectorRegistry()
    again = await budget(pool, registry).record_batch(
        records(*sent, voided, lowered, raised, moved)
    )
    assert +again.counts == {"duplicate": 9}
    assert results(registry) == {"duplicate": 5}
    assert await counters(pool, tenant) == before


async def test_a_correction_waits_until_its_event_is_counted(pool: asyncpg.Pool) -> None:
    """Never a move before the count it corrects: the counters could go below zero."""
    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.40")
    void = correction(event, "void")
    await store(pool, event)
    await judge(pool, void)

    waiting = await budget(pool).record_batch(records(void))

    assert +waiting.counts == {"deferred": 1}
    parked = await pool.fetch(
        "SELECT consumer, correction_id, record_value FROM correction_waits WHERE tenant_id = $1",
        tenant,
    )
    assert [tuple(r) for r in parked] == [("budget", void["correction_id"], encode(void))]
    assert await counters(pool, tenant) == {}
    # The event and a copy of the correction in one batch: the event counts first.
    both = await budget(pool).record_batch(records(void, event))
    assert +both.counts == {"recorded": 2}
    assert await counters(pool, tenant) == {}  # counted, then voided
    assert not await pool.fetchval(
        "SELECT count(*) FROM correction_waits WHERE tenant_id = $1", tenant
    )


async def test_two_replicas_apply_one_correction_once(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """The correction buckets serialise the two; the second finds the first's record."""
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd="0.25") for _ in range(20)]
    await store(pool, *events)
    await budget(pool).record_batch(records(*events))
    sent = [correction(event, customer_charge_usd="0.75") for event in events]
    for one in sent:
        await judge(pool, one)
    batch = records(*sent)

    # Both replicas are in their transactions at once: a counter row they both move is held
    # until each is waiting (the first on the row, the second on the first's buckets).
    replica_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute(
                "SELECT FROM budget_spend WHERE tenant_id = $1 FOR UPDATE", tenant
            )
            replicas = [
                asyncio.create_task(budget(replica_pool).record_batch(batch)) for _ in range(2)
            ]

            async def both_waiting() -> bool:
                waiting = await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
                return bool(waiting >= 2)

            await wait_until(both_waiting, within=30, message="the replicas did not both wait")
        first, second = await asyncio.gather(*replicas)
    finally:
        await blocker.close()
        await replica_pool.close()

    assert first.counts + second.counts == Counter({"recorded": 20, "duplicate": 20})
    monthly = await counters(pool, tenant)
    assert monthly[("tenant", tenant, "monthly", clock.this_month())] == Decimal("15.00")


async def test_a_move_up_alerts_once_and_a_move_down_never(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    await set_policy(pool, tenant, "deployment", "dep-1", monthly="1.00")
    first = usage_event(tenant, customer_charge_usd="0.50")
    await store(pool, first)
    await budget(pool).record_batch(records(first))
    raise_first = correction(first, customer_charge_usd="0.90")  # crosses the warning (0.80)
    await judge(pool, raise_first)
    await budget(pool).record_batch(records(raise_first))
    assert await outbox(pool, tenant) == [("warning", "0.9", first["gateway_request_id"])]

    void_first = correction(first, "void", minutes=1)  # back below the warning: nothing retracted
    await judge(pool, void_first)
    await budget(pool).record_batch(records(void_first))
    second = usage_event(tenant, customer_charge_usd="0.85")  # crosses the warning again
    await store(pool, second)
    await budget(pool).record_batch(records(second))
    raise_second = correction(second, customer_charge_usd="1.00")  # reaches the limit
    await judge(pool, raise_second)
    await budget(pool).record_batch(records(raise_second))

    assert await outbox(pool, tenant) == [
        ("warning", "0.9", first["gateway_request_id"]),
        ("exceeded", "1", second["gateway_request_id"]),
    ]


@pytest.mark.parametrize(
    ("spent_before", "charge", "crossed"),
    [
        ("0.50", "0.60", ["warning", "exceeded"]),  # the counter exists: it nets to 0
        (None, "0.90", ["warning"]),  # it does not: created at 0
    ],
)
async def test_a_level_an_event_crosses_alerts_though_its_void_in_the_same_batch_takes_it_back(
    pool: asyncpg.Pool, spent_before: str | None, charge: str, crossed: list[str]
) -> None:
    tenant = unique("tenant")
    await set_policy(pool, tenant, "deployment", "dep-1", monthly="1.00")
    if spent_before is not None:
        earlier = usage_event(tenant, customer_charge_usd=spent_before)
        await store(pool, earlier)
        await budget(pool).record_batch(records(earlier))
    event = usage_event(tenant, customer_charge_usd=charge)
    await store(pool, event)
    void = correction(event, "void")
    await judge(pool, void)

    outcome = await budget(pool).record_batch(records(event, void))

    assert +outcome.counts == {"recorded": 2}
    spent = Decimal(spent_before or 0)
    assert [(level, Decimal(spend), by) for level, spend, by in await outbox(pool, tenant)] == [
        (level, spent + Decimal(charge), event["gateway_request_id"]) for level in crossed
    ]
    month = clock.month_of(datetime.fromisoformat(event["occurred_at"]))
    assert (await counters(pool, tenant)).get(("deployment", "dep-1", "monthly", month)) == (
        None if spent_before is None else spent
    )


async def outbox(pool: asyncpg.Pool, tenant: str) -> list[tuple[str, str, str]]:
    """The tenant's alerts as decided: level, spend then and the id that crossed it."""
    rows = await pool.fetch(
        "SELECT payload FROM budget_alert_outbox WHERE tenant_id = $1 ORDER BY seq", tenant
    )
    alerts = [json.loads(r[0]) for r in rows]
    return [(a["level"], a["spend_usd"], a["triggered_by"]) for a in alerts]


async def test_a_day_before_the_budget_horizon_moves_nothing(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    old_day = budget_horizon(clock.now()) - timedelta(days=1)
    event = usage_event(tenant, customer_charge_usd="0.50", occurred_at=f"{old_day}T12:00:00Z")
    await store(pool, event)
    await budget(pool).record_batch(records(event))
    raised = correction(event, customer_charge_usd="5")
    await judge(pool, raised)

    outcome = await budget(pool).record_batch(records(raised))

    assert +outcome.counts == {"recorded": 1}
    assert await counters(pool, tenant) == {}
    assert (
        await pool.fetchval("SELECT count(*) FROM budget_corrections WHERE tenant_id = $1", tenant)
        == 1
    )


async def test_a_reused_correction_id_moves_nothing(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.50")
    await store(pool, event)
    await budget(pool).record_batch(records(event))
    judged = correction(event, customer_charge_usd="0.70")
    await judge(pool, judged)
    reused = {**judged, "fields": {"customer_charge_usd": "7"}}  # other content, same id

    outcome = await budget(pool).record_batch(records(reused))

    assert +outcome.counts == {"rejected": 1}
    assert (await counters(pool, tenant))[("tenant", tenant, "monthly", clock.this_month())] == (
        Decimal("0.50")
    )


async def test_moves_lower_a_counter_under_its_lock_and_never_below_zero(
    pool: asyncpg.Pool,
) -> None:
    """A counter whose moves sum below 0 is lowered by the second statement; the counters come
    back with their value before, after, and at most (for an event a later move takes back)."""
    tenant = unique("tenant")
    month = clock.this_month()
    at = clock.earlier_today()
    await set_policy(pool, tenant, "tenant", tenant, monthly="10")
    await set_policy(pool, tenant, "deployment", "dep-1", monthly="1")
    tenant_month = (tenant, "tenant", tenant, "monthly", month)
    deployment_month = (tenant, "deployment", "dep-1", "monthly", month)
    horizon = budget_horizon(clock.now())

    def move(request_id: str, deployment_id: str | None, amount: str) -> ChargeMove:
        return ChargeMove(request_id, tenant, deployment_id, None, None, at, Decimal(amount))

    async with pool.acquire() as connection, connection.transaction():
        created = await add_to_counters(
            connection, evaluated_from=horizon, staged=False, moves=[move("r1", "dep-1", "2")]
        )
        assert {k: (c.before_usd, c.after_usd, c.peak_usd) for k, c in created.items()} == {
            tenant_month: (Decimal(0), Decimal(2), None),
            deployment_month: (Decimal(0), Decimal(2), None),
        }
        limited = await add_to_counters(
            connection,
            evaluated_from=horizon,
            staged=False,
            moves=[move("r2", None, "8"), move("r1", "dep-1", "-1.5")],
        )
    assert {k: (c.before_usd, c.after_usd, c.peak_usd) for k, c in limited.items()} == {
        tenant_month: (Decimal(2), Decimal("8.5"), Decimal(10)),
        deployment_month: (Decimal(2), Decimal("0.5"), Decimal(2)),
    }
    assert await counters(pool, tenant) == {
        ("tenant", tenant, "monthly", month): Decimal("8.5"),
        ("tenant", tenant, "daily", utc_day(at)): Decimal("8.5"),
        ("deployment", "dep-1", "monthly", month): Decimal("0.5"),
        ("deployment", "dep-1", "daily", utc_day(at)): Decimal("0.5"),
    }
    async with pool.acquire() as connection, connection.transaction():
        # Up and then further down on one counter: it falls, and its peak is what it rose to.
        # Exactly back where it was on another: read, not written, with its peak.
        limited = await add_to_counters(
            connection,
            evaluated_from=horizon,
            staged=False,
            moves=[move("r3", "dep-1", "0.2"), move("r1", "dep-1", "-0.4")],
        )
    assert {k: (c.before_usd, c.after_usd, c.peak_usd) for k, c in limited.items()} == {
        tenant_month: (Decimal("8.5"), Decimal("8.3"), Decimal("8.7")),
        deployment_month: (Decimal("0.5"), Decimal("0.3"), Decimal("0.7")),
    }
    async with pool.acquire() as connection, connection.transaction():
        limited = await add_to_counters(
            connection,
            evaluated_from=horizon,
            staged=False,
            moves=[move("r4", None, "0.1"), move("r2", None, "-0.1")],
        )
    assert {k: (c.before_usd, c.after_usd, c.peak_usd) for k, c in limited.items()} == {
        tenant_month: (Decimal("8.3"), Decimal("8.3"), Decimal("8.4")),
    }
    with pytest.raises(asyncpg.CheckViolationError):
        async with pool.acquire() as connection, connection.transaction():
            await add_to_counters(
                connection,
                evaluated_from=horizon,
                staged=False,
                moves=[move("r1", "dep-1", "-0.6")],
            )


# Three partitions, and the alerts topic the relay publishes to.
topics = test_budget_consumer.topics


async def test_the_consumer_follows_the_usage_verdict_and_drops_an_unknown(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    await clock.clear_of_midnight()
    tenant = unique("tenant")
    at = clock.earlier_today()
    await set_policy(pool, tenant, "tenant", tenant, monthly="2", pct=50)
    kept, dropped = [
        usage_event(tenant, customer_charge_usd="0.50", occurred_at=clock.iso(at)) for _ in range(2)
    ]
    await store(pool, kept, dropped)
    raised, void = correction(kept, customer_charge_usd="1.60"), correction(dropped, "void")
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(tenant.encode(), encode(v)) for v in (kept, dropped, raised, void)],
    )
    consumer = await spawn_consumer(
        topics, env=budget_env(topics, CORRECTION_RETRY_SECONDS="0.2"), worker="budget"
    )
    try:

        async def parked() -> bool:
            waits = await pool.fetchval(
                "SELECT count(*) FROM correction_waits WHERE tenant_id = $1 AND consumer = $2",
                tenant,
                "budget",
            )
            return bool(waits == 2)

        await wait_until(parked, within=60, message="the corrections were not parked")
        assert await counters(pool, tenant) == expected(
            at,
            {
                ("tenant", tenant): "1.00",
                ("deployment", "dep-1"): "1.00",
                ("user", "user-1"): "1.00",
            },
        )
        await judge(pool, raised)
        await judge(pool, void, "unknown")

        async def resolved() -> bool:
            return not await pool.fetchval(
                "SELECT count(*) FROM correction_waits WHERE tenant_id = $1", tenant
            )

        await wait_until(resolved, within=30, message="the parked corrections stayed")

        async def alerted() -> bool:
            return len(await alerts_on(topics, tenant)) == 2

        await wait_until(alerted, within=30, message="the raised charge did not alert")
    finally:
        consumer.process.send_signal(signal.SIGTERM)
        assert await consumer.finished(within=30) == 0, consumer.log_tail()
    spend = {
        ("tenant", tenant): "2.10",
        ("deployment", "dep-1"): "2.10",
        ("user", "user-1"): "2.10",
    }
    assert await counters(pool, tenant) == expected(at, spend)
    assert [(a["level"], a["triggered_by"]) for a in await alerts_on(topics, tenant)] == [
        ("warning", dropped["gateway_request_id"]),  # the events reached 1.00, half the limit
        ("exceeded", kept["gateway_request_id"]),  # the correction, 1.00 + 1.10
    ]
    applied = await pool.fetch(
        "SELECT correction_id FROM budget_corrections WHERE tenant_id = $1", tenant
    )
    assert [r[0] for r in applied] == [raised["correction_id"]]


@pytest.mark.parametrize(
    "window_rows", ["attributed", "before-0017"], ids=["window-attributed", "window-before-0017"]
)
async def test_both_consumers_agree_on_a_stream_of_corrections(
    topics: PipelineTopics, pool: asyncpg.Pool, window_rows: str
) -> None:
    """The usage consumer's verdicts, then the budget consumer's counters: reconcile finds the
    counters equal to the effective events, and the applied corrections all counted. The budget
    consumer reads the events' attribution from the id window, or from the stored events when
    the window's rows were written before they kept it (migration 0017)."""
    await clock.clear_of_midnight()
    tenant = unique("tenant")
    at = clock.earlier_today()
    voided, moved, twice = [
        usage_event(tenant, customer_charge_usd=charge, occurred_at=clock.iso(at))
        for charge in ("0.40", "0.30", "0.20")
    ]
    sent = [
        correction(voided, "void"),
        correction(moved, deployment_id="dep-2", user_id="user-2", customer_charge_usd="0.35"),
        correction(twice, minutes=2, customer_charge_usd="0.05"),  # wins, though first here
        correction(twice, minutes=1, customer_charge_usd="7"),
    ]
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(tenant.encode(), encode(v)) for v in (voided, moved, twice, *sent)],
    )
    usage = await spawn_consumer(topics, "--exit-when-idle", "3", env=topics.environment())
    assert await usage.finished(within=120) == 0, usage.log_tail()
    if window_rows == "before-0017":
        forgotten = await pool.execute(
            "UPDATE usage_event_ids SET user_id = NULL, agent_id = NULL, attributed = false "
            "WHERE tenant_id = $1 AND attributed",
            tenant,
        )
        assert forgotten == "UPDATE 3"
    await run_until_idle(topics)

    spend = {
        ("tenant", tenant): "0.40",
        ("deployment", "dep-1"): "0.05",
        ("user", "user-1"): "0.05",
        ("deployment", "dep-2"): "0.35",
        ("user", "user-2"): "0.35",
    }
    assert await counters(pool, tenant) == expected(at, spend)
    await assert_reconciled(pool, topics.settings, [period_of(clock.this_month())], tenant)


@pytest.mark.parametrize("citus", [False, True], ids=["one-node-form", "citus-form"])
async def test_window_events_reads_each_id_of_its_tenant_only(
    pool: asyncpg.Pool, citus: bool
) -> None:
    tenant, other = unique("tenant"), unique("tenant")
    counted, uncounted, missing = unique("req"), unique("req"), unique("req")
    at = clock.now()
    await pool.execute(
        "INSERT INTO usage_event_ids (gateway_request_id, tenant_id, deployment_id, user_id, "
        "agent_id, attributed, input_tokens, output_tokens, cached_input_tokens, "
        "reasoning_tokens, total_tokens, customer_charge_usd, occurred_at, counted) "
        "SELECT g, $1, 'd', u, null, a, 1, 1, 0, 0, 2, 1.25, $2, c "
        "FROM unnest($3::text[], $4::boolean[], $5::text[], $6::boolean[]) AS x(g, c, u, a)",
        tenant,
        at,
        [counted, uncounted],
        [True, False],
        ["user-1", None],
        [True, False],  # the second as written before migration 0017
    )
    async with pool.acquire() as connection:
        found = await window_events(
            connection,
            [(tenant, counted), (tenant, uncounted), (tenant, missing), (other, counted)],
            citus=citus,
        )

    assert found == {
        (tenant, counted): WindowEvent(True, True, "d", "user-1", None, Decimal("1.25"), at),
        (tenant, uncounted): WindowEvent(False, False, "d", None, None, Decimal("1.25"), at),
    }
