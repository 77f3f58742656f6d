"""Two replicas of the usage consumer racing to store one gateway_request_id.

The gateway may publish the same event twice and, when its key changes or is missing, the two
copies land on different partitions, owned by different replicas of the group. Whichever replica
stores the id first, the other must count its copy as a duplicate (or dead-letter it once as a
conflicting duplicate), never store it twice. The race is forced, not hoped for: a table lock
held by the test lets both replicas look the id up (nothing is stored yet) and then holds both
writes until both wait on it, so both write the id at once and one of them loses.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal

import asyncpg
import pytest

from llm_usage.consumers.usage.recorder import LANDING_AGAIN
from llm_usage.domain.periods import add_months, period_of
from tests import clock
from tests.integration.pipeline import (
    RunningConsumer,
    assert_reconciled,
    create_pipeline_topics,
    encode,
    header,
    produce_to_partitions,
    read_topic,
    sessions_blocked_by,
    spawn_consumer,
    stored_for,
    topic_record_count,
    unique,
    usage_event,
    wait_until,
    writes_held,
)


def held_partitions(replica: RunningConsumer) -> list[int]:
    """The partitions of the replica's latest assignment."""
    assigned = replica.logged("Partitions assigned.")
    if not assigned:
        return []
    return sorted(int(name.rsplit("[", 1)[1].rstrip("]")) for name in assigned[-1]["partitions"])


@pytest.mark.parametrize("second_copy", ["same content", "conflicting content"])
async def test_one_id_on_two_partitions_is_stored_once_whichever_replica_wins(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool, second_copy: str
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    # Idle time counts from the split; it must outlast publishing two records.
    replicas = [await spawn_consumer(topics, "--exit-when-idle", "8") for _ in range(2)]

    async def one_partition_each() -> bool:
        held = [held_partitions(replica) for replica in replicas]
        return sorted(held) == [[0], [1]]

    await wait_until(
        one_partition_each,
        within=90,
        message="the group never gave each replica one partition:\n"
        + "\n\n".join(replica.log_tail() for replica in replicas),
    )
    # The partition each replica holds for the race: once the first replica leaves the group,
    # the other is given both before it, too, goes idle and stops.
    partition_of = {index: held_partitions(replica)[0] for index, replica in enumerate(replicas)}

    tenant = unique("tenant")
    event = usage_event(tenant, customer_charge_usd="0.0054")
    copy = (
        event
        if second_copy == "same content"
        else {**event, "customer_charge_usd": "0.0099", "customer_charge_cents": 1}
    )
    published = {0: encode(event), 1: encode(copy)}
    key = tenant.encode()
    async with writes_held(database_url) as holder:
        placed = await produce_to_partitions(
            kafka_bootstrap_servers,
            topics.usage,
            [(p, key, value) for p, value in published.items()],
        )
        assert [partition for partition, _ in placed] == [0, 1]

        # Each replica has looked the id up (reads are not held) and found nothing; both now
        # wait to write it.
        async def both_replicas_write_the_id() -> bool:
            return await sessions_blocked_by(pool, holder) == 2

        await wait_until(
            both_replicas_write_the_id,
            within=60,
            message="\n\n".join(replica.log_tail() for replica in replicas),
        )
    # Released: both COPY the id at once; one commits, the other's COPY fails on its key.

    for replica in replicas:
        assert await replica.finished(within=120) == 0, replica.log_tail()

    [row] = await stored_for(pool, [event["gateway_request_id"]])
    stopped = [replica.logged("Consumer stopped.")[0] for replica in replicas]
    recorded = [entry.get("recorded", 0) for entry in stopped]
    assert sorted(recorded) == [0, 1], stopped
    winner = recorded.index(1)
    loser = 1 - winner
    won_partition, lost_partition = partition_of[winner], partition_of[loser]

    # The loser did lose the race (its COPY failed and it landed again), and only the loser.
    assert len(replicas[loser].logged(LANDING_AGAIN)) == 1
    assert not replicas[winner].logged(LANDING_AGAIN)

    # The stored row is the winner's copy.
    winner_event = event if won_partition == 0 else copy
    assert row["customer_charge_usd"] == Decimal(winner_event["customer_charge_usd"])
    assert stopped[winner].get("duplicate", 0) == stopped[winner].get("conflict", 0) == 0

    bootstrap = topics.settings.kafka_bootstrap_servers
    if second_copy == "same content":
        assert stopped[loser].get("duplicate") == 1, stopped
        assert stopped[loser].get("conflict", 0) == 0, stopped
        assert await topic_record_count(bootstrap, topics.dlq) == 0
    else:
        assert stopped[loser].get("conflict") == 1, stopped
        assert stopped[loser].get("duplicate", 0) == 0, stopped
        assert await topic_record_count(bootstrap, topics.dlq) == 1
        [dead] = await read_topic(bootstrap, topics.dlq, expected=1)
        assert header(dead, "dlq.reason") == "conflicting_duplicate"
        assert header(dead, "dlq.partition") == str(lost_partition)
        assert dead.value == published[lost_partition]
        assert dead.key == key


async def test_conflicting_copies_in_two_months_raced_by_usage_and_budget_replicas(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """Two copies of one id, in two months (two partitions of the events table), with two
    charges, on two Kafka partitions: two usage and two budget replicas all write the id at
    once. Whichever copy wins, it is the one stored and the one counted; the other is
    dead-lettered and counts nothing."""
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    groups = {
        worker: [await spawn_consumer(topics, "--exit-when-idle", "8", worker=worker) for _ in "ab"]
        for worker in ("usage", "budget")
    }
    everyone = [replica for replicas in groups.values() for replica in replicas]

    async def one_partition_each() -> bool:
        return all(
            sorted(held_partitions(r) for r in replicas) == [[0], [1]]
            for replicas in groups.values()
        )

    await wait_until(
        one_partition_each,
        within=90,
        message="\n\n".join(replica.log_tail() for replica in everyone),
    )
    tenant = unique("tenant")
    this_month = clock.this_month()
    last_month = add_months(this_month, -1)
    first = usage_event(tenant, customer_charge_usd="0.0054")
    copies = {
        0: first,
        1: {
            **first,
            "customer_charge_usd": "0.0099",
            "customer_charge_cents": 1,
            "occurred_at": datetime.combine(last_month, time(12), tzinfo=UTC).isoformat(),
        },
    }
    key = tenant.encode()
    async with writes_held(database_url) as holder:
        await produce_to_partitions(
            kafka_bootstrap_servers,
            topics.usage,
            [(p, key, encode(copy)) for p, copy in copies.items()],
        )

        async def all_four_write_the_id() -> bool:
            return await sessions_blocked_by(pool, holder) == 4

        await wait_until(
            all_four_write_the_id,
            within=60,
            message="\n\n".join(replica.log_tail() for replica in everyone),
        )

    for replica in everyone:
        assert await replica.finished(within=120) == 0, replica.log_tail()
    [row] = await stored_for(pool, [copies[0]["gateway_request_id"]])
    winner = 0 if row["customer_charge_usd"] == Decimal("0.0054") else 1
    assert row["occurred_at"] == datetime.fromisoformat(copies[winner]["occurred_at"])
    spend = await pool.fetch(
        "SELECT period_start, spend_usd FROM budget_spend WHERE tenant_id = $1 "
        "AND scope_type = 'tenant' AND \"window\" = 'monthly'",
        tenant,
    )
    won_month = this_month if winner == 0 else last_month
    assert [(r["period_start"], r["spend_usd"]) for r in spend] == [
        (won_month, Decimal(copies[winner]["customer_charge_usd"]))
    ]
    [dead] = await read_topic(kafka_bootstrap_servers, topics.dlq, expected=1)
    assert header(dead, "dlq.reason") == "conflicting_duplicate"
    assert dead.value == encode(copies[1 - winner])
    await assert_reconciled(
        pool, topics.settings, [period_of(last_month), period_of(this_month)], tenant
    )
