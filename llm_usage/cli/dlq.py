"""`llm-usage dlq replay`: republish chosen dead letters to the usage topic after a fix.

Safe to repeat: the usage consumer stores each `gateway_request_id` once, and a conflicting
re-use is dead-lettered again rather than overwriting what was billed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands
from llm_usage.core.errors import ConfigurationError
from llm_usage.schemas.dead_letter import (
    DETAIL_HEADER,
    OFFSET_HEADER,
    PARTITION_HEADER,
    REASON_HEADER,
    REPLAYED_FROM_HEADER,
    TOPIC_HEADER,
    DeadLetterReason,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord

    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    dlq = commands.add_parser("dlq", help="the dead-letter topic: replay records after a fix")
    dlq.set_defaults(run=run_dlq_command)
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    replay = actions.add_parser(
        "replay", help="republish dead letters (original key and bytes) to the usage topic"
    )
    replay.add_argument("--partition", type=int, required=True, help="DLQ partition")
    replay.add_argument("--from-offset", type=int, default=0, metavar="N", help="first [0]")
    replay.add_argument(
        "--to-offset", type=int, metavar="N", help="last, included [the end of the partition]"
    )
    replay.add_argument(
        "--reason",
        choices=[reason.value for reason in DeadLetterReason],
        action="append",
        help="only dead letters with this dlq.reason (repeatable) [all]",
    )
    replay.add_argument(
        "--detail-contains", metavar="TEXT", help="only dead letters whose dlq.detail has TEXT"
    )
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")


@dataclass(frozen=True)
class DeadLetterRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers.get(REASON_HEADER, "")

    @property
    def origin(self) -> str:
        return "{}/{}/{}".format(
            self.headers.get(TOPIC_HEADER, "?"),
            self.headers.get(PARTITION_HEADER, "?"),
            self.headers.get(OFFSET_HEADER, "?"),
        )


def chosen(
    letters: Sequence[DeadLetterRecord], *, reasons: Sequence[str] | None, detail: str | None
) -> list[DeadLetterRecord]:
    """The dead letters that match every filter given; a letter without a value (too large
    for the DLQ) cannot be replayed from here and is never chosen."""
    return [
        letter
        for letter in letters
        if letter.value is not None
        and (not reasons or letter.reason in reasons)
        and (detail is None or detail in letter.headers.get(DETAIL_HEADER, ""))
    ]


def _as_letter(record: ConsumerRecord) -> DeadLetterRecord:
    headers = {name: bytes(value or b"").decode(errors="replace") for name, value in record.headers}
    return DeadLetterRecord(record.partition, record.offset, record.key, record.value, headers)


async def read_dead_letters(
    settings: Settings, *, partition: int, from_offset: int, to_offset: int | None
) -> list[DeadLetterRecord]:
    from aiokafka.structs import TopicPartition  # noqa: PLC0415 - Kafka's stack, when run

    from llm_usage.kafka.clients import new_reader, start_client  # noqa: PLC0415

    reader = new_reader(settings)
    await start_client(reader, settings)
    try:
        tp = TopicPartition(settings.dlq_topic, partition)
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        last = end - 1 if to_offset is None else min(to_offset, end - 1)
        reader.seek(tp, from_offset)
        letters: list[DeadLetterRecord] = []
        while await reader.position(tp) <= last:
            fetched = await reader.getmany(tp, timeout_ms=1000)
            for record in fetched.get(tp, []):
                if record.offset <= last:
                    letters.append(_as_letter(record))
        return letters
    finally:
        await reader.stop()


async def run_dlq_command(args: argparse.Namespace, settings: Settings) -> None:
    from llm_usage.kafka.authorization import require_permissions  # noqa: PLC0415
    from llm_usage.kafka.clients import new_producer, start_client  # noqa: PLC0415
    from llm_usage.kafka.permissions import Worker  # noqa: PLC0415

    await require_permissions(settings, Worker.OPERATOR)
    producer = new_producer(settings)
    await start_client(producer, settings)
    try:
        partitions = await producer.partitions_for(settings.dlq_topic)
        if args.partition not in partitions:
            raise ConfigurationError(
                f"--partition {args.partition}: {settings.dlq_topic} has partitions "
                f"{sorted(partitions)}"
            )
        letters = await read_dead_letters(
            settings,
            partition=args.partition,
            from_offset=args.from_offset,
            to_offset=args.to_offset,
        )
        picked = chosen(letters, reasons=args.reason, detail=args.detail_contains)
        for letter in picked:
            print(
                f"{'would replay' if args.dry_run else 'replaying'} {settings.dlq_topic}"
                f"[{letter.partition}]@{letter.offset} (from {letter.origin}, {letter.reason})"
            )
        if not args.dry_run:
            await _republish(producer, settings, picked)
    finally:
        await producer.stop()
    verb = "would be replayed" if args.dry_run else f"replayed to {settings.usage_topic}"
    print(f"{len(picked)} of {len(letters)} dead letters {verb}")


async def _republish(
    producer: AIOKafkaProducer, settings: Settings, letters: Sequence[DeadLetterRecord]
) -> None:
    """Send every letter's original key and bytes; return once the broker acknowledged all."""
    sent = [
        await producer.send(
            settings.usage_topic,
            key=letter.key,
            value=letter.value,
            headers=[
                (
                    REPLAYED_FROM_HEADER,
                    f"{settings.dlq_topic}/{letter.partition}/{letter.offset}".encode(),
                )
            ],
        )
        for letter in letters
    ]
    for delivery in sent:
        await delivery
