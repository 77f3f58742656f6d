"""The dead-letter sink: rejected records go to a topic with their original key and bytes, and
headers that say why and where they came from."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from llm_usage.runtime.handler import DeadLetter
from llm_usage.schemas.dead_letter import dead_letter_headers


class DeadLetterSink(Protocol):
    """Where a consumer's rejected records go. A consumer without one never rejects a record."""

    @property
    def topic(self) -> str: ...

    async def publish(self, dead_letters: Sequence[DeadLetter], *, failed_at: datetime) -> None:
        """Return once every dead letter is acknowledged; raise if any was not."""


@dataclass(frozen=True)
class KafkaDeadLetterSink:
    """Dead letters on a Kafka topic, sent with the worker's idempotent producer."""

    producer: AIOKafkaProducer
    topic: str

    async def publish(self, dead_letters: Sequence[DeadLetter], *, failed_at: datetime) -> None:
        await publish_dead_letters(self.producer, self.topic, dead_letters, failed_at=failed_at)


async def publish_dead_letters(
    producer: AIOKafkaProducer,
    topic: str,
    dead_letters: Sequence[DeadLetter],
    *,
    failed_at: datetime,
) -> None:
    """Send every dead letter and wait until the broker has acknowledged all of them."""
    if dead_letters:
        await asyncio.gather(
            *(_deliver(producer, topic, letter, failed_at) for letter in dead_letters)
        )


async def _deliver(
    producer: AIOKafkaProducer, topic: str, letter: DeadLetter, failed_at: datetime
) -> None:
    record = letter.record
    headers = _headers(letter, letter.detail, failed_at)
    try:
        await producer.send_and_wait(topic, key=record.key, value=record.value, headers=headers)
    except MessageSizeTooLargeError:
        # The original is larger than the dead-letter topic accepts. Retrying cannot help and
        # failing would stop the partition: keep the key and the headers (they say where the
        # original still is), drop the value.
        detail = (
            f"{letter.detail} [value of {len(record.value or b'')} bytes not copied: too large "
            "for the dead-letter topic; read it at dlq.topic/dlq.partition/dlq.offset]"
        )
        headers = _headers(letter, detail, failed_at)
        await producer.send_and_wait(topic, key=record.key, value=None, headers=headers)


def _headers(letter: DeadLetter, detail: str, failed_at: datetime) -> list[tuple[str, bytes]]:
    return dead_letter_headers(
        reason=letter.reason,
        detail=detail,
        topic=letter.record.topic,
        partition=letter.record.partition,
        offset=letter.record.offset,
        failed_at=failed_at,
    )
