"""What a topic holds, read outside any consumer group: its partitions, their end offsets, and
every record up to those ends."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


class TopicNotFoundError(LookupError):
    """The broker does not know the topic (or refused to describe it)."""


async def partitions_of(bootstrap_servers: str, topic: str) -> list[int]:
    """The partition numbers of `topic`, from a fresh metadata read."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0:
        raise TopicNotFoundError(f"topic {topic}: error code {described['error_code']}")
    return sorted(int(p["partition"]) for p in described["partitions"])


async def end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """The end offset (high watermark) of every partition of `topic`, by partition number."""
    partitions = await partitions_of(bootstrap_servers, topic)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await reader.start()
    try:
        ends = await reader.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        await reader.stop()


async def read_to_end(bootstrap_servers: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of `topic`, from the start of each partition up to its end offset
    when asked (records published meanwhile may or may not be among them)."""
    partitions = [TopicPartition(topic, p) for p in await partitions_of(bootstrap_servers, topic)]
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await reader.start()
    try:
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in partitions if await reader.position(tp) < ends[tp]]:
            for batch in (await reader.getmany(timeout_ms=1000)).values():
                records.extend(batch)
        return records
    finally:
        await reader.stop()
