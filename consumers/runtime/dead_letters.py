"""Publishing rejected records to the dead-letter topic: original key and bytes, reason headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from schemas.dead_letter import DeadLetterReason, dead_letter_headers


@dataclass(frozen=True)
class DeadLetter:
    """A consumed record that will not be stored, and why."""

    record: ConsumerRecord  # aiokafka ships no types
    reason: DeadLetterReason
    detail: str


async def publish_dead_letters(
    producer: AIOKafkaProducer,
    topic: str,
    dead_letters: Sequence[DeadLetter],
    *,
    failed_at: datetime,
) -> None:
    """Send every dead letter and wait until the broker has acknowledged all of them."""
    if not dead_letters:
        return
    deliveries = [
        await producer.send(
            topic,
            key=letter.record.key,
            value=letter.record.value,
            headers=dead_letter_headers(
                reason=letter.reason,
                detail=letter.detail,
                topic=letter.record.topic,
                partition=letter.record.partition,
                offset=letter.record.offset,
                failed_at=failed_at,
            ),
        )
        for letter in dead_letters
    ]
    await asyncio.gather(*deliveries)
