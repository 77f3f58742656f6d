"""The alerts topic read to its end, outside any group: the alert ids on it (the relay marks
what a crashed relay published; reconcile counts each id's copies)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import TopicPartition

from llm_usage.core.errors import MissingTopicError
from llm_usage.core.settings import Settings
from llm_usage.domain.reconcile import TopicAlerts
from llm_usage.kafka.clients import new_reader, start_client

T = TypeVar("T")
_READ_SECONDS = 120


async def alert_ids_after(
    reader: AIOKafkaConsumer, partitions: list[TopicPartition], positions: dict[int, int]
) -> tuple[list[str], dict[int, int]]:
    """The alert ids on `partitions` from `positions` (the beginning where none is recorded) to
    their current ends, and those ends."""
    found, ends, _ = await _records_after(reader, partitions, positions, _alert_id_of)
    return [alert_id for alert_id, _ in found], ends


async def read_alerts(settings: Settings) -> TopicAlerts:
    """Every alert on `settings.alerts_topic`: copies per id, each id's tenant and period, and
    since when the topic holds everything (None when retention never deleted a record of it)."""
    reader = new_reader(settings)
    await start_client(reader, settings)
    try:
        topic = settings.alerts_topic
        # A fresh metadata read: the reader's own cache knows no topic before it is assigned.
        cluster = await reader._client.fetch_all_metadata()
        numbers = sorted(cluster.partitions_for_topic(topic) or ())
        if not numbers:
            raise MissingTopicError(
                f"topic {topic} does not exist on the broker; create it with `llm-usage topics "
                "ensure` (or fix ALERTS_TOPIC), or pass --no-topic"
            )
        partitions = [TopicPartition(topic, p) for p in numbers]
        found, _, starts = await _records_after(reader, partitions, {}, _alert_of)
    finally:
        await reader.stop()
    copies: Counter[str] = Counter()
    owners: dict[str, tuple[str, date]] = {}
    firsts: dict[int, datetime] = {}
    for (alert_id, owner), record in found:
        copies[alert_id] += 1
        owners[alert_id] = owner
        firsts.setdefault(record.partition, datetime.fromtimestamp(record.timestamp / 1000, UTC))
    retained_since = None
    if any(starts.values()):  # retention deleted records: only what is left can be judged
        retained_since = max(firsts.values(), default=datetime.max.replace(tzinfo=UTC))
    return TopicAlerts(dict(copies), owners, retained_since)


async def _records_after(
    reader: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    positions: dict[int, int],
    parse: Callable[[bytes | None], T | None],
) -> tuple[list[tuple[T, ConsumerRecord[bytes, bytes]]], dict[int, int], dict[int, int]]:
    """What `parse` makes of each record (None: skipped) from `positions` to the ends, the
    ends, and each partition's first offset kept."""
    reader.assign(partitions)
    ends = {tp.partition: offset for tp, offset in (await reader.end_offsets(partitions)).items()}
    # One request for every partition's first offset, then plain seeks: aiokafka's
    # seek_to_beginning waits for its fetcher's next round (up to fetch_max_wait_ms, 500 ms)
    # per call, which held a starting relay's first alerts back by seconds on 6 partitions.
    # A recorded position that retention has deleted since starts at the first offset kept.
    starts = await reader.beginning_offsets(partitions)
    for tp in partitions:
        reader.seek(tp, max(positions.get(tp.partition, 0), starts[tp]))
    found: list[tuple[T, ConsumerRecord[bytes, bytes]]] = []
    deadline = time.monotonic() + _READ_SECONDS
    while time.monotonic() < deadline:
        remaining = [tp for tp in partitions if await reader.position(tp) < ends[tp.partition]]
        if not remaining:
            return found, ends, {tp.partition: offset for tp, offset in starts.items()}
        fetched = await reader.getmany(*remaining, timeout_ms=500)
        found.extend(
            (parsed, record)
            for records in fetched.values()
            for record in records
            if (parsed := parse(record.value)) is not None
        )
    raise TimeoutError(
        f"could not read the alerts topic to its end within {_READ_SECONDS} s: {partitions}"
    )


def _alert_id_of(value: bytes | None) -> str | None:
    try:
        alert_id = json.loads(value or b"")["alert_id"]
    except (ValueError, TypeError, KeyError):
        return None  # not an alert of ours; nothing to mark
    return str(alert_id)


def _alert_of(value: bytes | None) -> tuple[str, tuple[str, date]] | None:
    try:
        alert = json.loads(value or b"")
        owner = (str(alert["tenant_id"]), date.fromisoformat(alert["period_start"]))
        return str(alert["alert_id"]), owner
    except (ValueError, TypeError, KeyError):
        return None
