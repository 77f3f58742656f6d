"""Kafka records built by hand, for tests that drive consumers without a broker."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from llm_usage.runtime.handler import Record


def consumer_record(
    value: bytes | None, *, offset: int, key: bytes | None = b"t1", partition: int = 0
) -> Record:
    """A record as `getmany` returns it, from topic `usage`."""
    return ConsumerRecord(
        topic="usage",
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=(),
    )
