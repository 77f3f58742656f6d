"""Corrections (`llm_usage_corrected`) applied by the usage consumer against a real PostgreSQL
(and a real Kafka where the dead-letter topic or a process matters): the history, the effective
values, and both aggregates moved exactly as if the corrected event had been stored as corrected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.correction_waits import retry_round
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.core.faults import FAULT_EXIT_CODE, FAULT_VARIABLE
from llm_usage.domain.corrections import Action, Correction
from llm_usage.domain.periods import add_months, period_of
from llm_usage.domain.usage import Usage
from llm_usage.rollup.run import close_month, run_rollup
from llm_usage.runtime.correction_metrics import correction_metrics
from llm_usage.runtime.handler import BatchOutcome, DeadLetter, Record
from llm_usage.storage import corrections as corrections_storage
from llm_usage.storage.corrections import (
    CORRECTION_LOCK_CLASS,
    find_events,
    lock_correction_buckets,
    try_lock_correction_buckets,
)
from llm_usage.storage.usage_totals import move_daily_totals
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    header,
    produce,
    read_topic,
    spawn_consumer,
    unique,
    usage_event,
)
from tests.integration.test_usage_consumer import consume_until_idle, events_counted
from tests.records import consumer_record

_OFFSETS = iter(range(10**9))


def records(values: Sequence[dict[str, Any]]) -> list[Record]:
    return [
        consumer_record(encode(value), offset=next(_OFFSETS), key=value["tenant_id"].encode())
        for value in values
    ]


def correction(
    event: dict[str, Any],
    action: str = "amend",
    *,
    fields: dict[str, Any] | None = None,
    correction_id: str | None = None,
    after: timedelta = timedelta(0),
    hint: bool = True,
) -> dict[str, Any]:
    """A correction of `event`; its own time is `after` later than a minute ago (so the test
    orders corrections by `after`, and none is in the future)."""
    body: dict[str, Any] = {
        "event_type": "llm_usage_corrected",
        "schema_version": 1,
        "correction_id": correction_id or unique("c"),
        "gateway_request_id": event["gateway_request_id"],
        "tenant_id": event["tenant_id"],
        "action": action,
        "reason": "wrong figures",
        "actor": "ops@example.com",
        "occurred_at": clock.iso(clock.now() - timedelta(minutes=1) + after),
    }
    if fields is not None:
        body["fields"] = fields
    if hint:
        body["event_occurred_at"] = event["occurred_at"]
    return body


async def land(pool: asyncpg.Pool, *values: dict[str, Any], wait: float = 900) -> BatchOutcome:
    recorder = UsageRecorder(pool=pool, clock=clock.now, correction_wait_seconds=wait)
    return await recorder.record_batch(records(values))


async def totals(pool: asyncpg.Pool, tenant: str) -> dict[str | None, tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT deployment_id, sum(charge_usd) AS c, sum(input_tokens) AS i, "
        "sum(output_tokens) AS o, sum(requests) AS r, sum(estimated_charge_usd) AS e "
        "FROM usage_daily_totals WHERE tenant_id = $1 GROUP BY deployment_id",
        tenant,
    )
    return {
        row["deployment_id"]: (row["c"], row["i"], row["o"], row["r"], row["e"])
        for row in rows
        if row["r"] or row["c"]
    }


_DIMENSION_FIGURES = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "charge_usd",
    "estimated_charge_usd",
)


async def dimensions(
    pool: asyncpg.Pool, tenant: str
) -> dict[tuple[str, str | None], tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT dimension, key, "
        + ", ".join(f"sum({f}) AS {f}" for f in _DIMENSION_FIGURES)
        + " FROM usage_daily_dimensions WHERE tenant_id = $1 GROUP BY dimension, key",
        tenant,
    )
    return {
        (row["dimension"], row["key"]): tuple(row[f] for f in _DIMENSION_FIGURES)
        for row in rows
        if any(row[f] for f in _DIMENSION_FIGURES)
    }


async def assert_aggregates_are_the_effective_events(pool: asyncpg.Pool, tenant: str) -> None:
    """Both aggregates equal sums over the effective view's events that are not voided."""
    expected_totals = {
        row["deployment_id"]: (row["c"], row["i"], row["o"], row["r"], row["e"])
        for row in await pool.fetch(
            "SELECT deployment_id, sum(customer_charge_usd) AS c, sum(input_tokens) AS i, "
            "sum(output_tokens) AS o, count(*) AS r, coalesce(sum(customer_charge_usd) "
            "FILTER (WHERE charge_estimated), 0) AS e "
            "FROM llm_usage_events_effective WHERE tenant_id = $1 AND NOT voided "
            "GROUP BY deployment_id",
            tenant,
        )
    }
    assert await totals(pool, tenant) == expected_totals
    expected_dimensions: dict[tuple[str, str | None], tuple[Any, ...]] = {}
    for dimension, column in (
        ("deployment", "deployment_id"),
        ("model", "model"),
        ("provider", "provider"),
        ("user", "user_id"),
        ("agent", "agent_id"),
        ("channel", "channel"),
        ("feature", "feature"),
    ):
        for row in await pool.fetch(
            f"SELECT {column} AS key, count(*) AS requests, sum(input_tokens) AS input_tokens, "
            "sum(output_tokens) AS output_tokens, sum(cached_input_tokens) AS cached_input_tokens, "
            "sum(reasoning_tokens) AS reasoning_tokens, sum(total_tokens) AS total_tokens, "
            "sum(customer_charge_usd) AS charge_usd, coalesce(sum(customer_charge_usd) "
            "FILTER (WHERE charge_estimated), 0) AS estimated_charge_usd "
            "FROM llm_usage_events_effective WHERE tenant_id = $1 AND NOT voided "
            f"GROUP BY {column}",
            tenant,
        ):
            expected_dimensions[(dimension, row["key"])] = tuple(row[f] for f in _DIMENSION_FIGURES)
    assert await dimensions(pool, tenant) == expected_dimensions


async def history(pool: asyncpg.Pool, tenant: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM usage_corrections WHERE tenant_id = $1", tenant)
    return {row["correction_id"]: row for row in rows}


async def effective(pool: asyncpg.Pool, event: dict[str, Any]) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM llm_usage_events_effective WHERE tenant_id = $1 AND gateway_request_id = $2",
        event["tenant_id"],
        event["gateway_request_id"],
    )
    assert row is not None
    return row


async def test_a_void_removes_the_event_from_both_aggregates(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    event, other = usage_event(tenant), usage_event(tenant, customer_charge_usd="0.25")
    await land(pool, event, other)
    void = correction(event, "void")
    outcome = await land(pool, void)

    assert outcome.counts == {"recorded": 1}
    assert await totals(pool, tenant) == {"dep-1": (Decimal("0.25"), 1200, 300, 1, Decimal(0))}
    await assert_aggregates_are_the_effective_events(pool, tenant)
    row = (await history(pool, tenant))[void["correction_id"]]
    assert (row["verdict"], row["won"], row["late"]) == ("applied", True, False)
    assert row["charge_delta_usd"] == Decimal("-0.0054")
    assert (await effective(pool, event))["voided"] is True
    # The stored row is untouched.
    stored = await pool.fetchval(
        "SELECT customer_charge_usd FROM llm_usage_events WHERE gateway_request_id = $1",
        event["gateway_request_id"],
    )
    assert stored == Decimal("0.0054")


async def test_an_amend_moves_deployment_and_user_with_aggregates_moved_exactly(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant, agent_id="agent-1")
    await land(pool, event, usage_event(tenant, user_id="u-2", deployment_id="dep-2"))
    amend = correction(
        event,
        fields={
            "deployment_id": "dep-2",
            "user_id": "u-2",
            "input_tokens": 10,
            "output_tokens": 5,
            "customer_charge_usd": "0.0100000001",
        },
    )
    assert (await land(pool, amend)).counts == {"recorded": 1}

    assert await totals(pool, tenant) == {
        "dep-2": (Decimal("0.0154000001"), 1210, 305, 2, Decimal(0))
    }
    user_rows = {k: v for k, v in (await dimensions(pool, tenant)).items() if k[0] == "user"}
    assert user_rows == {
        ("user", "u-2"): (2, 1210, 305, 0, 0, 1515, Decimal("0.0154000001"), Decimal(0))
    }
    await assert_aggregates_are_the_effective_events(pool, tenant)
    row = (await history(pool, tenant))[amend["correction_id"]]
    assert (row["from_deployment_id"], row["to_deployment_id"]) == ("dep-1", "dep-2")
    view = await effective(pool, event)
    assert (view["deployment_id"], view["total_tokens"], view["corrected"]) == ("dep-2", 15, True)


async def test_the_later_amend_wins_whichever_arrives_last(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    first, second = usage_event(tenant), usage_event(tenant)
    await land(pool, first, second)
    for event, order in ((first, "in order"), (second, "reversed")):
        early = correction(event, fields={"input_tokens": 1}, after=timedelta(seconds=1))
        late = correction(event, fields={"input_tokens": 2}, after=timedelta(seconds=2))
        sent = [early, late] if order == "in order" else [late, early]
        for body in sent:  # one batch each
            assert (await land(pool, body)).counts == {"recorded": 1}
        assert (await effective(pool, event))["input_tokens"] == 2, order
        rows = await history(pool, tenant)
        assert rows[late["correction_id"]]["won"] is True
    await assert_aggregates_are_the_effective_events(pool, tenant)
    assert (await totals(pool, tenant))["dep-1"][1] == 4


async def test_voiding_a_voided_event_changes_nothing_and_an_amend_after_revives_it(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    await land(pool, event)
    await land(pool, correction(event, "void", after=timedelta(seconds=1)))
    await land(pool, correction(event, "void", after=timedelta(seconds=2)))
    assert await totals(pool, tenant) == {}
    await assert_aggregates_are_the_effective_events(pool, tenant)

    await land(pool, correction(event, fields={"output_tokens": 7}, after=timedelta(seconds=3)))
    assert await totals(pool, tenant) == {"dep-1": (Decimal("0.0054"), 1200, 7, 1, Decimal(0))}
    await assert_aggregates_are_the_effective_events(pool, tenant)
    assert (
        await pool.fetchval(
            "SELECT corrections FROM usage_event_effective WHERE gateway_request_id = $1",
            event["gateway_request_id"],
        )
        == 3
    )


async def test_a_repeated_correction_is_a_duplicate_and_a_reused_id_is_dead_lettered(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    await land(pool, event)
    void = correction(event, "void")
    reused = {**void, "action": "amend", "fields": {"input_tokens": 1}}
    first = await land(pool, void, void)
    second = await land(pool, void, reused)

    assert first.counts == {"recorded": 1, "duplicate": 1}
    assert second.counts == {"duplicate": 1, "conflict": 1}
    [dead] = second.dead_letters
    assert dead.reason == "conflicting_duplicate"
    assert "action" in dead.detail
    assert "fields" in dead.detail
    assert dead.record.value == encode(reused)
    assert await totals(pool, tenant) == {}
    assert len(await history(pool, tenant)) == 1


async def test_a_correction_before_its_event_in_the_same_batch_applies(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    outcome = await land(pool, correction(event, "void"), event)
    assert outcome.counts == {"recorded": 2}
    assert await totals(pool, tenant) == {}
    await assert_aggregates_are_the_effective_events(pool, tenant)


class Collected:
    """A dead-letter sink that keeps what it is given."""

    topic = "dlq"

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def publish(self, dead_letters: Sequence[DeadLetter], *, failed_at: datetime) -> None:
        self.letters.extend(dead_letters)


async def test_a_correction_of_an_earlier_batch_waits_for_its_event(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    amend = correction(event, fields={"customer_charge_usd": "1"}, hint=False)
    assert (await land(pool, amend)).counts == {"deferred": 1}
    sink = Collected()
    first = await retry_round(pool, sink, now=clock.now(), wait_seconds=900)
    assert first.results["applied"] == 0  # the event is still missing
    await land(pool, event)
    second = await retry_round(pool, sink, now=clock.now(), wait_seconds=900)

    assert second.results["applied"] == 1
    assert sink.letters == []
    assert await totals(pool, tenant) == {"dep-1": (Decimal(1), 1200, 300, 1, Decimal(0))}
    await assert_aggregates_are_the_effective_events(pool, tenant)
    waiting = await pool.fetchval(
        "SELECT count(*) FROM correction_waits WHERE tenant_id = $1", tenant
    )
    assert waiting == 0


async def test_a_round_takes_the_waits_of_several_tenants_in_groups(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round's transactions each take a group of tenants; every group's waits apply."""
    monkeypatch.setattr(corrections_storage, "TENANTS_PER_RETRY", 2)
    tenants = [unique("tenant") for _ in range(3)]
    events = [usage_event(tenant) for tenant in tenants]
    for event in events:
        amend = correction(event, fields={"customer_charge_usd": "1"}, hint=False)
        assert (await land(pool, amend)).counts == {"deferred": 1}
    await land(pool, *events)

    outcome = await retry_round(pool, Collected(), now=clock.now(), wait_seconds=900)

    assert outcome.results["applied"] >= 3  # and any other test's waits whose event came
    for tenant in tenants:
        assert await totals(pool, tenant) == {"dep-1": (Decimal(1), 1200, 300, 1, Decimal(0))}
        await assert_aggregates_are_the_effective_events(pool, tenant)
    waiting = await pool.fetchval(
        "SELECT count(*) FROM correction_waits WHERE tenant_id = ANY($1::text[])", tenants
    )
    assert waiting == 0


async def test_an_unknown_event_is_dead_lettered_with_the_original_record(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics: PipelineTopics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers,
        database_url=database_url,
        correction_wait_seconds=1,
        correction_retry_seconds=0.2,
    )
    tenant = unique("tenant")
    ghost = usage_event(tenant)  # never sent
    body = correction(ghost, "void")
    key = tenant.encode()
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, [(key, encode(body))])
    metrics = await consume_until_idle(topics, idle_seconds=4)

    assert events_counted(metrics, "deferred") == 1
    [dead] = await read_topic(topics.settings.kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "unknown_event"
    assert ghost["gateway_request_id"] in header(dead, "dlq.detail")
    assert dead.key == key
    assert dead.value == encode(body)
    row = (await history(pool, tenant))[body["correction_id"]]
    assert row["verdict"] == "unknown"
    unknown = metrics.get_sample_value(
        "llm_usage_corrections_total", {"consumer": "usage", "result": "unknown"}
    )
    assert unknown == 1


async def test_a_crash_before_commit_applies_nothing_and_the_restart_applies_once(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    key = tenant.encode()
    bootstrap = topics.settings.kafka_bootstrap_servers
    await produce(bootstrap, topics.usage, [(key, encode(event))])
    await consume_until_idle(topics)
    body = correction(event, "void")
    await produce(bootstrap, topics.usage, [(key, encode(body))])
    crashing = await spawn_consumer(
        topics, env={**topics.environment(), FAULT_VARIABLE: "usage_corrections_written"}
    )
    assert await crashing.finished(within=120) == FAULT_EXIT_CODE, crashing.log_tail()
    assert await history(pool, tenant) == {}
    assert await totals(pool, tenant) == {"dep-1": (Decimal("0.0054"), 1200, 300, 1, Decimal(0))}

    restarted = await spawn_consumer(topics, "--exit-when-idle", "2")
    assert await restarted.finished(within=120) == 0, restarted.log_tail()
    assert list(await history(pool, tenant)) == [body["correction_id"]]
    assert await totals(pool, tenant) == {}
    await assert_aggregates_are_the_effective_events(pool, tenant)


async def test_a_correction_of_an_event_past_the_window_is_found_with_or_without_the_hint(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    hinted, unhinted = usage_event(tenant), usage_event(tenant)
    await land(pool, hinted, unhinted)
    # As if both had left the id window (DEDUP_WINDOW_HOURS): only Tier 1 knows them.
    await pool.execute(
        "DELETE FROM usage_event_ids WHERE gateway_request_id = ANY($1::text[])",
        [hinted["gateway_request_id"], unhinted["gateway_request_id"]],
    )
    registry = CollectorRegistry()
    metrics = correction_metrics(registry, "usage")
    recorder = UsageRecorder(pool=pool, clock=clock.now, correction_metrics=metrics)
    outcome = await recorder.record_batch(
        records([correction(hinted, "void"), correction(unhinted, "void", hint=False)])
    )

    assert outcome.counts == {"recorded": 2}
    assert await totals(pool, tenant) == {}
    slow = registry.get_sample_value(
        "llm_usage_corrections_slow_lookups_total", {"consumer": "usage"}
    )
    assert slow == 1  # only the one without a hint walked the tenant's events
    applied = registry.get_sample_value(
        "llm_usage_corrections_total", {"consumer": "usage", "result": "applied"}
    )
    assert applied == 2


async def test_a_correction_of_a_closed_month_is_late_and_marks_the_month(
    rollup_db: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = rollup_db
    await clock.clear_of_midnight()
    tenant = unique("tenant")
    last_month = add_months(clock.this_month(), -1)
    period = period_of(last_month)
    event = usage_event(
        tenant,
        customer_charge_usd="1.00",
        occurred_at=f"{last_month + timedelta(days=9)}T12:00:00Z",
    )
    await land(pool, event)
    await close_month(pool, period=period, now=clock.now())
    void = correction(event, "void")
    await land(pool, void)

    row = (await history(pool, tenant))[void["correction_id"]]
    assert (row["late"], row["billed_in"]) == (True, None)
    marked = await pool.fetchval(
        "SELECT count(*) FROM usage_late_marks WHERE tenant_id = $1 AND period = $2",
        tenant,
        period,
    )
    assert marked == 1
    assert await totals(pool, tenant) == {}
    # The next open month's run trues the closed month down to nothing.
    preview = await run_rollup(pool, period=period_of(clock.this_month()))
    assert [
        (line.original_period, line.amount_cents)
        for line in preview.lines
        if line.tenant_id == tenant and line.kind == "llm_usage_adjustment"
    ] == [(period, -100)]


async def test_signed_moves_lower_existing_rows_and_refuse_to_go_below_zero(
    pool: asyncpg.Pool,
) -> None:
    await clock.clear_of_midnight()
    tenant = unique("tenant")
    day = clock.today()
    await land(pool, usage_event(tenant, deployment_id=None, customer_charge_usd="0.50"))
    mixed = Usage(Decimal("-0.25"), 10, -300, 0, Decimal(0))  # some figures up, some down
    async with pool.acquire() as connection, connection.transaction():
        await move_daily_totals(connection, {(tenant, None, day): mixed})
    assert await totals(pool, tenant) == {None: (Decimal("0.25"), 1210, 0, 1, Decimal(0))}

    lowering_nothing = Usage(Decimal("-1"), 0, 0, -1, Decimal(0))
    with pytest.raises(asyncpg.CheckViolationError):
        async with pool.acquire() as connection, connection.transaction():
            await move_daily_totals(connection, {(tenant, "dep-9", day): lowering_nothing})
    assert await totals(pool, tenant) == {None: (Decimal("0.25"), 1210, 0, 1, Decimal(0))}


async def test_a_row_that_only_falls_is_locked_by_the_rising_step_and_written_once(
    pool: asyncpg.Pool,
) -> None:
    """The rising upsert locks a falling row in key order without writing it; the lowering
    writes it: one new row version, not two."""
    await clock.clear_of_midnight()
    tenant = unique("tenant")
    day = clock.today()
    await land(pool, usage_event(tenant, deployment_id=None, customer_charge_usd="0.50"))
    falling = Usage(Decimal("-0.25"), -10, 0, 0, Decimal(0))
    async with pool.acquire() as connection, connection.transaction():
        await move_daily_totals(connection, {(tenant, None, day): falling})
        updated = await connection.fetchval(
            "SELECT pg_stat_get_xact_tuples_updated('usage_daily_totals'::regclass)"
        )
    assert updated == 1
    assert await totals(pool, tenant) == {None: (Decimal("0.25"), 1190, 300, 1, Decimal(0))}


async def test_a_replayed_unknown_correction_applies_once_its_event_is_stored(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    void = correction(event, "void")
    assert (await land(pool, void, wait=0.001)).counts == {"deferred": 1}
    sink = Collected()
    later = clock.now() + timedelta(seconds=1)
    assert (await retry_round(pool, sink, now=later, wait_seconds=0.001)).results["unknown"] == 1
    [letter] = sink.letters
    assert letter.reason == "unknown_event"
    assert (await history(pool, tenant))[void["correction_id"]]["verdict"] == "unknown"

    await land(pool, event)
    assert (await land(pool, void)).counts == {"recorded": 1}  # the DLQ replay
    row = (await history(pool, tenant))[void["correction_id"]]
    assert (row["verdict"], row["won"]) == ("applied", True)
    assert await totals(pool, tenant) == {}
    await assert_aggregates_are_the_effective_events(pool, tenant)


async def test_two_replicas_correcting_one_event_at_once_apply_each_correction_once(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    event = usage_event(tenant)
    await land(pool, event)
    ones = [
        correction(event, fields={"input_tokens": n}, after=timedelta(seconds=n))
        for n in range(1, 7)
    ]
    # Two partitions' batches (keyed by something else than the tenant), landed at once, each
    # with some corrections of the same event and a copy of one of the other's.
    first = UsageRecorder(pool=pool, clock=clock.now).record_batch(records([*ones[::2], ones[1]]))
    second = UsageRecorder(pool=pool, clock=clock.now).record_batch(records([*ones[1::2], ones[0]]))
    outcomes = await asyncio.gather(first, second)

    counts = outcomes[0].counts + outcomes[1].counts
    assert counts == {"recorded": 6, "duplicate": 2}
    assert (await effective(pool, event))["input_tokens"] == 6
    assert len(await history(pool, tenant)) == 6
    await assert_aggregates_are_the_effective_events(pool, tenant)


@pytest.mark.parametrize("citus", [False, True], ids=["one-node-form", "citus-form"])
async def test_find_events_takes_the_hint_else_the_window_of_the_same_tenant_only(
    pool: asyncpg.Pool, citus: bool
) -> None:
    tenant, other = unique("tenant"), unique("tenant")
    hinted, mis_hinted, unhinted, foreign = (usage_event(tenant) for _ in range(4))
    await land(pool, hinted, mis_hinted, unhinted, foreign)
    wrong = datetime.fromisoformat(mis_hinted["occurred_at"]) - timedelta(days=1)

    def asked(event: dict[str, Any], hint: datetime | None, *, of: str = tenant) -> Correction:
        return Correction(
            tenant_id=of,
            correction_id=unique("c"),
            gateway_request_id=event["gateway_request_id"],
            action=Action.VOID,
            fields={},
            reason="r",
            actor="a",
            occurred_at=clock.now(),
            event_occurred_at=hint,
        )

    async with pool.acquire() as connection:
        found = await find_events(
            connection,
            [
                asked(hinted, datetime.fromisoformat(hinted["occurred_at"])),
                asked(mis_hinted, wrong),  # a wrong hint: the window's time finds it
                asked(unhinted, None),  # no hint: the window's time finds it
                asked(foreign, None, of=other),  # the window's row is another tenant's
            ],
            citus=citus,
        )

    assert set(found.rows) == {
        (tenant, e["gateway_request_id"]) for e in (hinted, mis_hinted, unhinted)
    }
    assert all(row.tenant_id == tenant for row in found.rows.values())
    assert found.rows[(tenant, mis_hinted["gateway_request_id"])].occurred_at == (
        datetime.fromisoformat(mis_hinted["occurred_at"])
    )
    assert found.slow_lookups == 1  # the other tenant's correction, without a hint, walked


async def test_a_side_task_takes_only_the_buckets_no_batch_holds_without_waiting(
    pool: asyncpg.Pool,
) -> None:
    tenant = unique("tenant")
    events = [(tenant, unique("req")) for _ in range(40)]
    buckets = {
        (row["t"], row["g"]): row["b"]
        for row in await pool.fetch(
            "SELECT t, g, hashtext(t || '/' || g) & 255 AS b "
            "FROM unnest($1::text[], $2::text[]) AS u(t, g)",
            [e[0] for e in events],
            [e[1] for e in events],
        )
    }
    held = buckets[events[0]]
    async with pool.acquire() as batch, batch.transaction():
        await lock_correction_buckets(batch, events[:1])
        async with pool.acquire() as side, side.transaction():
            taken = await asyncio.wait_for(try_lock_correction_buckets(side, events), 5)
            locks = await side.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 "
                "AND pid = pg_backend_pid()",
                CORRECTION_LOCK_CLASS,
            )

    assert taken == {e for e in events if buckets[e] != held}
    assert taken  # 40 ids over 256 buckets: most are not in the held one
    assert locks == len({buckets[e] for e in taken})
