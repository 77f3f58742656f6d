"""The usage consumer against a real Kafka broker and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import timedelta, timezone
from decimal import Decimal

import asyncpg
from prometheus_client import CollectorRegistry

from llm_usage.consumers.usage.consumer import run_usage_consumer
from tests import clock
from tests.integration.pipeline import (
    PipelineTopics,
    RestartablePostgres,
    create_pipeline_topics,
    encode,
    header,
    logged_matching,
    produce,
    produce_one_record_batch,
    read_topic,
    sessions_blocked_by,
    spawn_consumer,
    stored_for,
    tenant_totals,
    topic_record_count,
    unique,
    usage_event,
    wait_until,
    writes_held,
)
from tests.unavailable import service_unavailable


async def consume_until_idle(
    topics: PipelineTopics, idle_seconds: float = 1.5
) -> CollectorRegistry:
    """Run the consumer in this process until it is idle; return the metrics it recorded."""
    registry = CollectorRegistry()
    await asyncio.wait_for(
        run_usage_consumer(topics.settings, exit_when_idle=idle_seconds, registry=registry),
        timeout=120,
    )
    return registry


def events_counted(registry: CollectorRegistry, result: str) -> float | None:
    return registry.get_sample_value(
        "llm_usage_consumer_events_total", {"consumer": "usage", "result": result}
    )


async def test_exact_and_reserialised_duplicates_change_nothing(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    at = clock.earlier_today().replace(microsecond=0)
    original = usage_event(tenant, customer_charge_usd="0.0054", occurred_at=clock.iso(at))
    # Same event written differently: a JSON number for the charge, other key order, other offset.
    reserialised = {
        **{k: original[k] for k in reversed(list(original))},
        "customer_charge_usd": "CHARGE",
        "occurred_at": at.astimezone(timezone(timedelta(hours=1))).isoformat(),
    }
    raw_reserialised = json.dumps(reserialised).replace('"CHARGE"', "0.00540")
    key = tenant.encode()
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(key, encode(original)), (key, encode(original)), (key, raw_reserialised.encode())],
    )
    await consume_until_idle(topics)
    # Two of them again, as a gateway retry storm would send them.
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(key, encode(original)), (key, raw_reserialised.encode())],
    )
    await consume_until_idle(topics)

    rows = await stored_for(pool, [original["gateway_request_id"]])
    assert len(rows) == 1
    assert rows[0]["customer_charge_usd"] == Decimal("0.0054")
    assert await tenant_totals(pool, tenant) == (1, Decimal("0.0054"))
    # Both runs are over (idle exit): whatever they would ever dead-letter is on the topic.
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 0


async def test_conflicting_duplicate_keeps_first_and_dead_letters(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    first = usage_event(tenant, customer_charge_usd="1.25", customer_charge_cents=125)
    conflicting = {**first, "customer_charge_usd": "9.99", "customer_charge_cents": 999}
    key = tenant.encode()
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, [(key, encode(first))])
    await consume_until_idle(topics)
    await produce(
        topics.settings.kafka_bootstrap_servers, topics.usage, [(key, encode(conflicting))]
    )
    metrics = await consume_until_idle(topics)
    assert events_counted(metrics, "conflict") == 1
    assert events_counted(metrics, "recorded") == 0

    rows = await stored_for(pool, [first["gateway_request_id"]])
    assert [row["customer_charge_usd"] for row in rows] == [Decimal("1.25")]
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 1
    [dead] = await read_topic(topics.settings.kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "conflicting_duplicate"
    assert "customer_charge_usd" in header(dead, "dlq.detail")
    assert dead.key == key
    assert dead.value == encode(conflicting)


async def test_conflicting_duplicate_within_one_batch_keeps_the_first(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    bootstrap = topics.settings.kafka_bootstrap_servers
    tenant = unique("tenant")
    first = usage_event(tenant, input_tokens=10)
    conflicting = {**first, "input_tokens": 11}
    key = tenant.encode()
    # One Kafka record batch on one partition, published before the consumer starts: it is
    # fetched whole, so all three records reach the handler in one batch (proved below).
    offsets = await produce_one_record_batch(
        bootstrap,
        topics.usage,
        0,
        [(key, encode(first)), (key, encode(conflicting)), (key, encode(first))],
    )
    consumer = await spawn_consumer(
        topics, "--exit-when-idle", "2", env={**topics.environment(), "LOG_LEVEL": "DEBUG"}
    )
    assert await consumer.finished(within=120) == 0, consumer.log_tail()

    # The only batch the consumer ever landed held all three records: the conflict and the
    # duplicate were settled against the first record of the same batch, not a stored row.
    assert [entry["size"] for entry in consumer.logged("Batch landed.")] == [3]
    [stopped] = consumer.logged("Consumer stopped.")
    assert {k: stopped.get(k) for k in ("recorded", "duplicate", "conflict", "dead_lettered")} == {
        "recorded": 1,
        "duplicate": 1,
        "conflict": 1,
        "dead_lettered": None,
    }
    rows = await stored_for(pool, [first["gateway_request_id"]])
    assert [row["input_tokens"] for row in rows] == [10]
    assert await topic_record_count(bootstrap, topics.dlq) == 1
    [dead] = await read_topic(bootstrap, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "conflicting_duplicate"
    assert "input_tokens" in header(dead, "dlq.detail")
    assert (header(dead, "dlq.partition"), header(dead, "dlq.offset")) == ("0", str(offsets[1]))
    assert dead.value == encode(conflicting)


async def test_each_malformed_kind_is_dead_lettered_while_good_events_around_it_are_stored(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    key = tenant.encode()
    bad: dict[str, bytes] = {
        "invalid_json": b'{"gateway_request_id": "x", ',
        "too_large": encode(usage_event(tenant, feature="x" * 70_000)),
        "schema_violation": encode(usage_event(tenant, occurred_at="2026-11-14T09:12:03")),
    }
    good = [usage_event(tenant, customer_charge_usd=f"0.{i:04d}") for i in range(1, 31)]
    records: list[tuple[bytes | None, bytes | None]] = []
    for index, event in enumerate(good):
        records.append((key, encode(event)))
        if index % 10 == 5:
            records.append((key, list(bad.values())[index // 10]))
    records.append((key, b"[1, 2, 3]"))  # JSON, but not an object
    await produce(topics.settings.kafka_bootstrap_servers, topics.usage, records)
    metrics = await consume_until_idle(topics)
    assert events_counted(metrics, "recorded") == len(good)
    assert events_counted(metrics, "dead_lettered") == 4
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 4
    for reason in ("invalid_json", "too_large", "schema_violation"):
        assert metrics.get_sample_value(
            "llm_usage_consumer_dead_letters_total", {"consumer": "usage", "reason": reason}
        ) == (2 if reason == "schema_violation" else 1)

    count, total = await tenant_totals(pool, tenant)
    assert count == len(good)
    assert total == sum(Decimal(e["customer_charge_usd"]) for e in good)
    dead = await read_topic(topics.settings.kafka_bootstrap_servers, topics.dlq, expected=4)
    by_value = {record.value: record for record in dead}
    assert len(dead) == 4
    for reason, value in bad.items():
        record = by_value[value]
        assert header(record, "dlq.reason") == reason
        assert record.key == key
        assert header(record, "dlq.topic") == topics.usage
        assert int(header(record, "dlq.offset")) >= 0
        assert header(record, "dlq.failed_at").endswith("Z")
    assert "occurred_at" in header(by_value[bad["schema_violation"]], "dlq.detail")
    assert header(by_value[b"[1, 2, 3]"], "dlq.reason") == "schema_violation"


async def test_consumer_killed_mid_stream_and_restarted_stores_every_event_once(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd=f"0.{i:06d}") for i in range(1, 20001)]
    expected_total = sum(Decimal(e["customer_charge_usd"]) for e in events)
    key = tenant.encode()
    await produce(
        topics.settings.kafka_bootstrap_servers, topics.usage, [(key, encode(e)) for e in events]
    )
    env = {**topics.environment(), "CONSUMER_MAX_BATCH": "200"}
    first = await spawn_consumer(topics, env=env)

    async def some_landed() -> bool:
        return (await tenant_totals(pool, tenant))[0] > 500

    await wait_until(some_landed, within=60, message="the first consumer stored nothing")
    await first.killed()  # SIGKILL: no shutdown, no final commit

    async def its_sessions_are_gone() -> bool:
        # A COMMIT already sent may still be applied; count only once its backend has ended.
        count = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'llm-usage'"
        )
        return bool(count == 0)

    await wait_until(its_sessions_are_gone, within=30, message="the killed consumer's sessions")
    stored_at_kill = (await tenant_totals(pool, tenant))[0]
    assert stored_at_kill < len(events), "killed too late to prove much"

    restarted = await spawn_consumer(topics, "--exit-when-idle", "2", env=env)
    assert await restarted.finished(within=120) == 0, restarted.log_tail()
    assert await tenant_totals(pool, tenant) == (len(events), expected_total)
    # The restart stored exactly what was missing; anything stored but not committed before the
    # kill was read again and dropped as a duplicate.
    [stopped] = restarted.logged("Consumer stopped.")
    assert stopped["recorded"] == len(events) - stored_at_kill
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 0


async def test_two_consumer_processes_split_six_partitions_with_exact_totals(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=6
    )
    env = {**topics.environment(), "CONSUMER_MAX_BATCH": "100"}
    # Idle time counts from the split; it must outlast producing the events on a slow machine.
    members = [await spawn_consumer(topics, "--exit-when-idle", "15", env=env) for _ in range(2)]

    def holding() -> list[set[str]]:
        held = []
        for member in members:
            assigned = member.logged("Partitions assigned.")
            held.append(set(assigned[-1]["partitions"]) if assigned else set())
        return held

    async def split() -> bool:
        held = holding()
        return all(held) and len(held[0] | held[1]) == 6 and not held[0] & held[1]

    await wait_until(split, within=60, message=f"the group never split the partitions: {holding()}")

    tenants = [unique("tenant") for _ in range(6)]
    events = [
        usage_event(tenants[i % 6], customer_charge_usd=f"{i}.{i:03d}") for i in range(1, 3001)
    ]
    # Fixed keys spread over all six partitions (tenant ids are random and might not).
    await produce(
        kafka_bootstrap_servers,
        topics.usage,
        [(f"k{i % 12}".encode(), encode(e)) for i, e in enumerate(events)],
    )
    for member in members:
        assert await member.finished(within=120) == 0, member.log_tail()
    for tenant in tenants:
        mine = [e for e in events if e["tenant_id"] == tenant]
        assert await tenant_totals(pool, tenant) == (
            len(mine),
            sum(Decimal(e["customer_charge_usd"]) for e in mine),
        ), "\n\n".join(member.log_tail() for member in members)
    recorded = [member.logged("Consumer stopped.")[0].get("recorded", 0) for member in members]
    assert sum(recorded) == len(events)
    assert all(count > 0 for count in recorded), recorded
    assert await topic_record_count(kafka_bootstrap_servers, topics.dlq) == 0


async def test_database_restart_during_consumption_loses_nothing(
    topics: PipelineTopics, pool: asyncpg.Pool, postgres: RestartablePostgres
) -> None:
    if not postgres.can_restart:
        service_unavailable("the PostgreSQL in use (DATABASE_URL) is not ours to restart")
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd=f"0.{i:05d}") for i in range(1, 12001)]
    key = tenant.encode()
    await produce(
        topics.settings.kafka_bootstrap_servers, topics.usage, [(key, encode(e)) for e in events]
    )
    env = {**topics.environment(), "CONSUMER_MAX_BATCH": "50"}
    consumer = await spawn_consumer(topics, "--exit-when-idle", "3", env=env)

    async def some_landed() -> bool:
        return (await tenant_totals(pool, tenant))[0] > 300

    await wait_until(some_landed, within=60, message="the consumer stored nothing")
    await asyncio.to_thread(postgres.restart)
    fresh = await asyncpg.connect(topics.settings.database_url)
    try:
        stored_at_restart = await fresh.fetchval(
            "SELECT count(*) FROM llm_usage_events WHERE tenant_id = $1", tenant
        )
    finally:
        await fresh.close()
    assert stored_at_restart < len(events), "restarted too late to prove much"
    assert await consumer.finished(within=150) == 0, consumer.log_tail()
    assert consumer.logged("Retrying after a transient failure."), consumer.log_tail()
    fresh = await asyncpg.connect(topics.settings.database_url)
    try:
        row = await fresh.fetchrow(
            "SELECT count(*) AS n, sum(customer_charge_usd) AS total "
            "FROM llm_usage_events WHERE tenant_id = $1",
            tenant,
        )
    finally:
        await fresh.close()
    assert row is not None
    assert (row["n"], row["total"]) == (
        len(events),
        sum(Decimal(e["customer_charge_usd"]) for e in events),
    ), consumer.log_tail()
    # No valid event was dead-lettered because the database was away.
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 0


async def test_sigterm_lands_the_batch_commits_and_exits_zero(
    topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    events = [usage_event(tenant) for _ in range(5000)]
    key = tenant.encode()
    await produce(
        topics.settings.kafka_bootstrap_servers, topics.usage, [(key, encode(e)) for e in events]
    )
    env = {**topics.environment(), "CONSUMER_MAX_BATCH": "20"}
    consumer = await spawn_consumer(topics, env=env)

    async def some_landed() -> bool:
        return (await tenant_totals(pool, tenant))[0] > 100

    await wait_until(some_landed, within=60, message="the consumer stored nothing")
    consumer.process.send_signal(signal.SIGTERM)
    assert await consumer.finished(within=60) == 0, consumer.log_tail()
    stored_at_stop = (await tenant_totals(pool, tenant))[0]
    assert stored_at_stop < len(events), "stopped too late to prove much"
    [stopped] = consumer.logged("Consumer stopped.")
    assert stopped["recorded"] == stored_at_stop

    # Everything stored was committed: the restart finds only the rest, and no duplicates.
    restarted = await spawn_consumer(topics, "--exit-when-idle", "2", env=env)
    assert await restarted.finished(within=120) == 0, restarted.log_tail()
    assert (await tenant_totals(pool, tenant))[0] == len(events)
    [stopped] = restarted.logged("Consumer stopped.")
    assert stopped.get("recorded", 0) == len(events) - stored_at_stop
    assert "duplicate" not in stopped
    assert await topic_record_count(topics.settings.kafka_bootstrap_servers, topics.dlq) == 0


async def test_missing_topic_stops_at_once_with_one_clear_line(topics: PipelineTopics) -> None:
    env = {**topics.environment(), "USAGE_TOPIC": unique("no-such-topic")}
    consumer = await spawn_consumer(topics, env=env)
    assert await consumer.finished(within=60) == 2
    last = consumer.lines[-1]
    assert last.startswith("llm-usage: error: topic no-such-topic-")
    assert "llm-usage topics ensure" in last
    assert not any("Traceback" in line for line in consumer.lines)


async def test_unreachable_broker_stops_with_one_clear_line(topics: PipelineTopics) -> None:
    env = {**topics.environment(), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    consumer = await spawn_consumer(topics, env=env)
    assert await consumer.finished(within=90) == 2
    assert consumer.lines[-1].startswith("llm-usage: error: cannot reach Kafka at 127.0.0.1:9")
    assert not any("Traceback" in line for line in consumer.lines)


async def test_a_member_joining_mid_stream_neither_loses_nor_doubles_anything(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=6
    )
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd=f"0.{i:06d}") for i in range(1, 20001)]
    await produce(
        kafka_bootstrap_servers,
        topics.usage,
        [(f"k{i % 12}".encode(), encode(e)) for i, e in enumerate(events)],
    )
    env = {
        **topics.environment(),
        "CONSUMER_MAX_BATCH": "10",
        "LOG_LEVEL": "DEBUG",
        # On a loaded machine the heartbeats below take a while: the wait must outlast them.
        "CONSUMER_REVOKE_WAIT_SECONDS": "50",
    }
    first = await spawn_consumer(topics, "--exit-when-idle", "4", env=env)

    async def under_way() -> bool:
        return (await tenant_totals(pool, tenant))[0] > 1000

    await wait_until(under_way, within=60, message="the first member stored nothing")

    def rebalance_heard(since: int) -> list[int]:
        """Lines where the first member's heartbeat was answered "the group is rebalancing"."""
        heard = logged_matching(first, "Heartbeat failed for group")
        return [i for i, entry in heard if i >= since and "rebalancing" in entry["event"]]

    async with writes_held(database_url) as holder:
        # The first member's next batch is now in flight and cannot land: its write waits for
        # the lock this test holds.
        async def first_member_blocked() -> bool:
            return await sessions_blocked_by(pool, holder) > 0

        await wait_until(first_member_blocked, within=60, message="the first member never wrote")
        stored_while_held = (await tenant_totals(pool, tenant))[0]
        mark = len(first.lines)
        second = await spawn_consumer(topics, "--exit-when-idle", "4", env=env)

        # The join starts a rebalance. The first member hears of it by heartbeat and starts
        # revoking at once (aiokafka calls the listener as it rejoins), with the batch in
        # flight. (Repeats of that warning are folded into one line by the log filter.)
        async def revoking_with_a_batch_in_flight() -> bool:
            return len(rebalance_heard(mark)) >= 1

        await wait_until(
            revoking_with_a_batch_in_flight,
            within=60,
            message=f"the first member never heard of the rebalance:\n{first.log_tail()}",
        )
        await asyncio.sleep(3)  # a heartbeat interval: the revocation is under way by now
        # While that batch is held, the revocation waits for it: nothing revoked, nothing handed
        # to the newcomer, the batch still blocked, nothing more stored.
        assert not first.logged("Partitions revoked."), first.log_tail()
        assert not second.logged("Partitions assigned."), second.log_tail()
        assert await sessions_blocked_by(pool, holder) > 0
        assert (await tenant_totals(pool, tenant))[0] == stored_while_held
    # Released: the batch lands, its offsets are committed, then the partitions move.

    for member in (first, second):
        assert await member.finished(within=150) == 0, member.log_tail()

    assert await tenant_totals(pool, tenant) == (
        len(events),
        sum(Decimal(e["customer_charge_usd"]) for e in events),
    )
    [heard, *_] = rebalance_heard(mark)
    landed_after = [i for i, _ in logged_matching(first, "Batch landed.") if i > heard]
    assert landed_after, "the batch in flight never landed after the rebalance began"
    assert first.logged("Partitions revoked."), "no rebalance happened"
    assert [e for e in second.logged("Partitions assigned.") if e["partitions"]], (
        "the joining member never held a partition"
    )
    # The batch in flight was committed before its partitions moved: the new owner did not read
    # any of it again, so nothing was even counted as a duplicate.
    stopped = [m.logged("Consumer stopped.")[0] for m in (first, second)]
    assert sum(entry.get("recorded", 0) for entry in stopped) == len(events)
    assert [entry.get("duplicate", 0) for entry in stopped] == [0, 0], stopped
    assert await topic_record_count(kafka_bootstrap_servers, topics.dlq) == 0
