"""A real dead-letter topic outage: the DLQ topic is deleted under a running consumer.

Offsets are committed only once a batch's dead letters are acknowledged, so while the DLQ is gone
the batch holding a bad record must not commit (however often it is retried), the consumer must
stay alive and say it is not ready, and once the topic is back the dead letter must arrive exactly
once and every valid event be stored exactly once. The broker must not create topics by itself
(the session's broker runs with auto.create.topics.enable=false): the test checks that the topic
stayed gone, or the outage would not have been one.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.error
import urllib.request
from decimal import Decimal

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from llm_usage.kafka.topics import ensure_topics
from llm_usage.testing.processes import free_port
from llm_usage.testing.topics import end_offsets
from tests.integration.pipeline import (
    PipelineTopics,
    RunningConsumer,
    committed_offsets,
    create_pipeline_topics,
    encode,
    header,
    produce,
    produce_one_record_batch,
    read_topic,
    spawn_consumer,
    stored_for,
    tenant_totals,
    topic_exists,
    topic_record_count,
    unique,
    usage_event,
    wait_until,
)

MALFORMED = b'{"gateway_request_id": "never stored", '


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a probe; (0, why) while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)


async def probe(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


async def delete_topic(bootstrap_servers: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        response = await admin.delete_topics([topic])
    finally:
        await admin.close()
    assert [error_code for _, error_code in response.topic_error_codes] == [0], response

    async def gone() -> bool:
        return not await topic_exists(bootstrap_servers, topic)

    await wait_until(gone, within=60, message=f"topic {topic} was never deleted")


async def committed_on_usage(topics: PipelineTopics) -> int:
    """The group's committed offset on the usage topic's only partition (0: none yet)."""
    committed = await committed_offsets(
        topics.settings.kafka_bootstrap_servers, topics.settings.usage_group_id, topics.usage
    )
    return committed.get(0, 0)


async def wait_ready(consumer: RunningConsumer, port: int, *, expected: int) -> None:
    async def answered() -> bool:
        return (await probe(port, "/readyz"))[0] == expected

    await wait_until(
        answered,
        within=150,
        message=f"/readyz never answered {expected}: {await probe(port, '/readyz')}\n"
        + consumer.log_tail(),
    )


@pytest.mark.parametrize(
    "dead_letters_before", [0, 1], ids=["first dead letter", "after an earlier dead letter"]
)
async def test_a_deleted_dlq_holds_the_batch_back_until_it_is_back_then_dead_letters_once(
    kafka_bootstrap_servers: str,
    database_url: str,
    pool: asyncpg.Pool,
    dead_letters_before: int,
) -> None:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=1
    )
    bootstrap = topics.settings.kafka_bootstrap_servers
    port = free_port()
    consumer = await spawn_consumer(topics, env={**topics.environment(), "METRICS_PORT": str(port)})
    try:
        await wait_ready(consumer, port, expected=200)
        tenant = unique("tenant")
        key = tenant.encode()
        if dead_letters_before:
            # The consumer's producer has written to the DLQ before the outage.
            earlier = usage_event(tenant, customer_charge_usd="0.0001")
            await produce(bootstrap, topics.usage, [(key, b"not json"), (key, encode(earlier))])

            async def earlier_landed() -> bool:
                return await committed_on_usage(topics) == 2

            await wait_until(earlier_landed, within=60, message=consumer.log_tail())
            assert await topic_record_count(bootstrap, topics.dlq) == 1

        await delete_topic(bootstrap, topics.dlq)
        valid = [usage_event(tenant, customer_charge_usd=f"0.{i:04d}") for i in range(1, 11)]
        records = [(key, encode(e)) for e in valid[:5]] + [(key, MALFORMED)]
        records += [(key, encode(e)) for e in valid[5:]]
        offsets = await produce_one_record_batch(bootstrap, topics.usage, 0, records)
        malformed_offset = offsets[5]

        # The batch's transaction commits before its dead letter is sent; then the send fails
        # (the topic is gone) and is retried: the consumer says it is not ready meanwhile.
        async def valid_stored() -> bool:
            stored = await stored_for(pool, [e["gateway_request_id"] for e in valid])
            return len(stored) == len(valid)

        await wait_until(valid_stored, within=60, message=consumer.log_tail())
        await wait_ready(consumer, port, expected=503)
        status, body = await probe(port, "/readyz")
        assert status == 503
        assert "dead_letter_publish" in body or "batch not landed" in body, body
        assert (await probe(port, "/healthz"))[0] == 200
        assert consumer.process.returncode is None, consumer.log_tail()
        # Nothing of the batch is committed: not the valid records before the bad one either.
        assert await committed_on_usage(topics) == offsets[0] < malformed_offset
        # The outage is real: the failed send did not bring the topic back.
        assert not await topic_exists(bootstrap, topics.dlq)

        await ensure_topics(topics.settings, [topics.dlq], partitions=1, replication_factor=1)

        async def batch_committed() -> bool:
            return await committed_on_usage(topics) == offsets[-1] + 1

        await wait_until(batch_committed, within=150, message=consumer.log_tail())
        await wait_ready(consumer, port, expected=200)
        consumer.process.send_signal(signal.SIGTERM)
        assert await consumer.finished(within=60) == 0, consumer.log_tail()
    finally:
        if consumer.process.returncode is None:
            await consumer.killed()

    # Everything the consumer will ever do is done: the recreated DLQ holds exactly one letter.
    assert await end_offsets(bootstrap, topics.dlq) == {0: 1}
    [dead] = await read_topic(bootstrap, topics.dlq, expected=1)
    assert dead.value == MALFORMED
    assert dead.key == key
    assert header(dead, "dlq.reason") == "invalid_json"
    assert (header(dead, "dlq.partition"), header(dead, "dlq.offset")) == (
        "0",
        str(malformed_offset),
    )
    stored = await stored_for(pool, [e["gateway_request_id"] for e in valid])
    assert len(stored) == len(valid)
    expected_total = sum(Decimal(e["customer_charge_usd"]) for e in valid)
    if dead_letters_before:
        expected_total += Decimal("0.0001")
    assert await tenant_totals(pool, tenant) == (len(valid) + dead_letters_before, expected_total)
    assert consumer.logged("Retrying after a transient failure.") or consumer.logged(
        "Batch did not land; it will be fetched again."
    )
