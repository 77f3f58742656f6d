"""`llm-usage topics ensure` against a real broker: every per-topic error code is read."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings, load_settings
from llm_usage.kafka.topics import ensure_topics, topic_errors
from tests.integration.pipeline import unique


def settings_for(bootstrap_servers: str) -> Settings:
    return load_settings(kafka_bootstrap_servers=bootstrap_servers, log_format="json")


async def broker_count(bootstrap_servers: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()


async def partition_counts(bootstrap_servers: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        present = sorted(set(await admin.list_topics()) & set(topics))
        described = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    return {entry["topic"]: len(entry["partitions"]) for entry in described}


async def test_a_replication_factor_above_the_broker_count_ends_in_one_line_naming_the_topic(
    kafka_bootstrap_servers: str,
) -> None:
    too_many = await broker_count(kafka_bootstrap_servers) + 1  # 2 on a single test broker
    base = unique("rf")
    topics = {
        "USAGE_TOPIC": f"{base}.usage",
        "DLQ_TOPIC": f"{base}.dlq",
        "ALERTS_TOPIC": f"{base}.a",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        "topics",
        "ensure",
        "--replication-factor",
        str(too_many),
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers, **topics},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 2, (out, err)
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("llm-usage: error: Kafka refused to create topic ")
    assert "INVALID_REPLICATION_FACTOR" in lines[0]
    assert "--replication-factor" in lines[0]
    assert any(f"'{name}'" in lines[0] for name in topics.values())
    assert await partition_counts(kafka_bootstrap_servers, list(topics.values())) == {}


async def test_an_invalid_topic_name_ends_in_an_error_naming_it_and_its_variable(
    kafka_bootstrap_servers: str,
) -> None:
    name = f"{unique('bad')} name!"

    with pytest.raises(ConfigurationError) as raised:
        await ensure_topics(settings_for(kafka_bootstrap_servers), [name], partitions=1)

    message = str(raised.value)
    assert f"topic {name!r}" in message
    assert "INVALID_TOPIC" in message
    assert "USAGE_TOPIC" in message
    assert "\n" not in message


async def test_the_brokers_answer_for_a_topic_that_exists_is_read_as_already_existing(
    kafka_bootstrap_servers: str,
) -> None:
    """The code path a lost creation race takes, on a real CreateTopics answer."""
    name = unique("twice")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
    await admin.start()
    try:
        first = await admin.create_topics([NewTopic(name, 1, 1)])
        second = await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()

    assert topic_errors(first) == []
    [error] = topic_errors(second)
    assert (error.topic, error.code, error.name) == (
        name,
        TopicAlreadyExistsError.errno,
        "TOPIC_ALREADY_EXISTS",
    )
    assert error.message is not None
    assert name in error.message
    assert not error.retriable


async def test_concurrent_ensures_of_the_same_new_topics_all_succeed_and_one_creates_each(
    kafka_bootstrap_servers: str,
) -> None:
    settings = settings_for(kafka_bootstrap_servers)
    names = [unique("race"), unique("race")]

    results = await asyncio.gather(
        *(ensure_topics(settings, names, partitions=3, replication_factor=1) for _ in range(4))
    )

    for name in names:
        states = [state for result in results for state in result if state.name == name]
        assert len(states) == 4
        assert [state.partitions for state in states] == [3, 3, 3, 3]
        assert sum(state.created for state in states) == 1
    assert await partition_counts(kafka_bootstrap_servers, names) == dict.fromkeys(names, 3)


async def test_concurrent_ensures_growing_one_topic_to_different_counts_all_succeed(
    kafka_bootstrap_servers: str,
) -> None:
    settings = settings_for(kafka_bootstrap_servers)
    name = unique("grow")
    await ensure_topics(settings, [name], partitions=2, replication_factor=1)
    wanted = [4, 6, 5, 6]

    results = await asyncio.gather(
        *(ensure_topics(settings, [name], partitions=count) for count in wanted)
    )

    for count, [state] in zip(wanted, results, strict=True):
        assert state.name == name
        assert not state.created
        assert count <= state.partitions <= max(wanted)
    assert await partition_counts(kafka_bootstrap_servers, [name]) == {name: max(wanted)}
