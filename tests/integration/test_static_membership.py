"""Static group membership (KIP-345): a replica killed and started again with the same
`KAFKA_GROUP_INSTANCE_ID` takes its partitions back without a rebalance.

Two real `consume usage` processes, each with its own instance id, share a group on the real
broker. One is SIGKILLed (no LeaveGroup, no commit, like an OOM kill) and started again with the
same id a few seconds later, inside the session. Meanwhile the survivor's partitions keep moving:
events sent to them are stored within seconds, and it never gives a partition up (no revoke,
no new assignment). The restarted replica gets its own partitions back and stores what waited on
them. With dynamic membership the restart's join would revoke every partition of the group.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from tests.integration.pipeline import (
    PipelineTopics,
    RunningConsumer,
    create_pipeline_topics,
    encode,
    produce_to_partitions,
    spawn_consumer,
    stored_for,
    unique,
    usage_event,
    wait_until,
)

PARTITIONS = 4
# What a restarted pod takes here: killed, started again after this long.
DOWN_SECONDS = 4.0
# The survivor stores an event on its own partitions within this long, also while the other
# replica is down (its poll wait is 500 ms; a rebalance would stop it for the whole session).
STORED_WITHIN = 5.0


def held_partitions(replica: RunningConsumer) -> list[int]:
    assigned = replica.logged("Partitions assigned.")
    if not assigned:
        return []
    return sorted(int(name.rsplit("[", 1)[1].rstrip("]")) for name in assigned[-1]["partitions"])


async def spawn_member(topics: PipelineTopics, instance_id: str) -> RunningConsumer:
    return await spawn_consumer(
        topics, env={**topics.environment(), "KAFKA_GROUP_INSTANCE_ID": instance_id}
    )


async def publish_and_time(
    topics: PipelineTopics, pool: asyncpg.Pool, partitions: list[int], *, within: float
) -> float:
    """Send one event to each of `partitions`; seconds until all are stored (at most `within`)."""
    tenant = unique("tenant")
    events = [usage_event(tenant, customer_charge_usd="0.01") for _ in partitions]
    started = time.monotonic()
    await produce_to_partitions(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(p, tenant.encode(), encode(event)) for p, event in zip(partitions, events, strict=True)],
    )

    async def stored() -> bool:
        ids = [event["gateway_request_id"] for event in events]
        return len(await stored_for(pool, ids)) == len(events)

    await wait_until(stored, within=within, message=f"events to {partitions} not stored")
    return time.monotonic() - started


async def test_a_killed_static_member_comes_back_without_a_rebalance(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers,
        database_url=database_url,
        partitions=PARTITIONS,
    )
    ids = [unique("replica-0"), unique("replica-1")]
    members = [await spawn_member(topics, instance_id) for instance_id in ids]

    async def split() -> bool:
        held = [held_partitions(member) for member in members]
        return all(held) and sorted(held[0] + held[1]) == list(range(PARTITIONS))

    await wait_until(
        split,
        within=90,
        message="the group never split the partitions:\n"
        + "\n\n".join(member.log_tail() for member in members),
    )
    victim, survivor = members
    theirs, ours = held_partitions(victim), held_partitions(survivor)
    # Both are in the group and fetching.
    await publish_and_time(topics, pool, list(range(PARTITIONS)), within=30)
    revoked_before = len(survivor.logged("Partitions revoked."))
    assigned_before = len(survivor.logged("Partitions assigned."))

    await victim.killed()
    killed_at = time.monotonic()
    # While it is down, the survivor's partitions keep moving; the victim's wait for it.
    while_down = []
    while time.monotonic() - killed_at < DOWN_SECONDS:
        while_down.append(await publish_and_time(topics, pool, ours, within=STORED_WITHIN))
    tenant = unique("waiting")
    waiting = [usage_event(tenant, customer_charge_usd="0.02") for _ in theirs]
    await produce_to_partitions(
        kafka_bootstrap_servers,
        topics.usage,
        [(p, tenant.encode(), encode(event)) for p, event in zip(theirs, waiting, strict=True)],
    )
    await asyncio.sleep(1.0)
    assert not await stored_for(pool, [event["gateway_request_id"] for event in waiting]), (
        "the victim's partitions moved to the survivor: a rebalance, not static membership"
    )

    restarted = await spawn_member(topics, ids[0])

    async def back() -> bool:
        return held_partitions(restarted) == theirs

    await wait_until(back, within=60, message=restarted.log_tail())

    async def waiting_stored() -> bool:
        ids_waiting = [event["gateway_request_id"] for event in waiting]
        return len(await stored_for(pool, ids_waiting)) == len(waiting)

    await wait_until(waiting_stored, within=30, message=restarted.log_tail())
    after = await publish_and_time(topics, pool, list(range(PARTITIONS)), within=STORED_WITHIN)

    assert len(survivor.logged("Partitions revoked.")) == revoked_before, survivor.log_tail()
    assert len(survivor.logged("Partitions assigned.")) == assigned_before, survivor.log_tail()
    assert held_partitions(survivor) == ours
    assert len(restarted.logged("Partitions assigned.")) == 1, restarted.log_tail()
    assert survivor.process.returncode is None, survivor.log_tail()
    logging.getLogger(__name__).info(
        f"survivor stored within {max(while_down):.2f} s while the other was down "
        f"({len(while_down)} rounds); all partitions after the restart: {after:.2f} s"
    )
