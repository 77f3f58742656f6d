"""The batch loop's decisions, driven through stand-ins for the Kafka consumer, the dead-letter
sink and the handler.

What the loop promises here: offsets move only after a batch landed, and only in the assignment
that fetched it; a batch that did not land is fetched again; a row the database refuses is
dead-lettered alone; a database that refuses every new row, or rows in a row, stops the loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError, UnsupportedCodecError
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from llm_usage.runtime.handler import BatchOutcome, BatchResult, DeadLetter, Record
from llm_usage.runtime.loop import BatchConsumer, LoopOptions
from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.probes import HealthState
from tests.records import consumer_record

TP = TopicPartition("usage", 0)  # where tests.records puts its records
TP1 = TopicPartition("usage", 1)


def record(offset: int, value: bytes, partition: int = 0) -> Record:
    return consumer_record(value, offset=offset, partition=partition)


class StandInConsumer:
    """Hands out the given polls, then nothing, then asks the loop to stop; remembers seeks and
    commits.

    A poll is a dict of partition to records, or an exception that getmany raises.
    """

    def __init__(
        self,
        polls: list[dict[TopicPartition, list[Record]] | BaseException],
        stopping: asyncio.Event,
    ) -> None:
        self.polls = polls
        self.stopping = stopping
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.paused_partitions: set[TopicPartition] = set()
        self.held = {TP}
        self.failing: set[TopicPartition] = set()  # partitions whose lone fetch raises
        self.drained = False

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPartition, Any]:
        if partitions:  # a probe of one partition
            if set(partitions) & self.failing:
                raise UnsupportedCodecError("Unknown compression codec 0x05")
            return {}
        if not self.polls:
            # The loop fetches the next batch while the last one lands: the first poll past the
            # script finds nothing new (as at the end of a topic), the one after asks to stop.
            if self.drained:
                self.stopping.set()
            self.drained = True
            return {}
        poll = self.polls.pop(0)
        if isinstance(poll, BaseException):
            raise poll
        return {tp: batch for tp, batch in poll.items() if tp not in self.paused_partitions}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks.append((tp, 0))

    async def committed(self, tp: TopicPartition) -> int | None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return set(self.held)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def highwater(self, tp: TopicPartition) -> int:
        return 0

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return None

    async def position(self, tp: TopicPartition) -> int:
        return 0


class StandInSink:
    topic = "usage.dlq"

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[DeadLetter] = []

    async def publish(self, dead_letters: Sequence[DeadLetter], *, failed_at: datetime) -> None:
        if self.fail:
            raise KafkaConnectionError("broker went away")
        self.sent.extend(dead_letters)


class RefusesBadRows:
    """Stores b"ok" rows, knows b"dup" rows already, and refuses a batch holding b"bad" (a CHECK
    violation) — as a table with a broken constraint would."""

    def __init__(self, error: BaseException | None = None, *, slow: float = 0) -> None:
        self.error = error
        self.slow = slow
        self.calls = 0
        self.sizes: list[int] = []

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        self.calls += 1
        self.sizes.append(len(records))
        await asyncio.sleep(self.slow)
        if self.error is not None:
            raise self.error
        if any(r.value == b"bad" for r in records):
            raise asyncpg.exceptions.CheckViolationError("violates check constraint")
        return BatchOutcome(
            Counter(
                {
                    BatchResult.RECORDED: sum(r.value == b"ok" for r in records),
                    BatchResult.DUPLICATE: sum(r.value == b"dup" for r in records),
                }
            )
        )


def loop_for(
    polls: list[dict[TopicPartition, list[Record]] | BaseException],
    handler: RefusesBadRows,
    sink: StandInSink | None,
    *,
    health: HealthState | None = None,
    **options: Any,
) -> tuple[BatchConsumer, StandInConsumer]:
    stopping = asyncio.Event()
    consumer = StandInConsumer(polls, stopping)
    loop = BatchConsumer(
        name="test",
        consumer=consumer,  # a stand-in: aiokafka is untyped
        handler=handler,
        dead_letters=sink,
        metrics=ConsumerMetrics.create(CollectorRegistry()),
        health=health or HealthState(),
        stopping=stopping,
        options=LoopOptions(**{"retry_seconds": 0.3, **options}),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
    )
    return loop, consumer


def batch_of(values: Sequence[bytes], first: int = 0) -> dict[TopicPartition, list[Record]]:
    return {TP: [record(first + i, value) for i, value in enumerate(values)]}


async def test_a_row_the_database_refuses_is_dead_lettered_alone_and_the_rest_land() -> None:
    values = [b"bad" if offset == 13 else b"ok" for offset in range(10, 17)]
    sink = StandInSink()
    loop, consumer = loop_for([batch_of(values, first=10)], RefusesBadRows(), sink)
    await loop.run()
    assert loop.totals == {"recorded": 6, "dead_lettered": 1, "refused_by_database": 1}
    [letter] = sink.sent
    assert (letter.record.offset, letter.reason.value) == (13, "schema_violation")
    assert letter.detail.startswith("rejected by the database: CheckViolationError")
    assert consumer.commits == [{TP: 17}]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([b"bad"] * 4, id="every row refused"),
        pytest.param([b"bad"], id="a one-record batch"),
        pytest.param([b"dup", b"bad", b"dup", b"dup"], id="duplicates land, the new row does not"),
    ],
)
async def test_refusing_every_new_row_stops_without_dead_lettering_or_committing(
    values: list[bytes],
) -> None:
    sink = StandInSink()
    handler = RefusesBadRows()
    loop, consumer = loop_for([batch_of(values)], handler, sink)
    await loop.run()
    assert sink.sent == []
    assert consumer.commits == []
    assert consumer.seeks == [(TP, 0)], "the batch is fetched again from its first offset"
    assert handler.sizes.count(len(values)) >= 2, "it was retried, not given up on at once"


async def test_refusals_in_a_row_across_batches_stop_the_loop() -> None:
    # Each batch stores rows but also has a refused one: alone, each looks like a bad row; in a
    # row, they are a database that refuses more than bad input would explain.
    polls: list[dict[TopicPartition, list[Record]] | BaseException] = [
        batch_of([b"ok", b"bad"], first=2 * n) for n in range(5)
    ]
    sink = StandInSink()
    loop, consumer = loop_for(polls, RefusesBadRows(), sink)
    await loop.run()
    assert [letter.record.offset for letter in sink.sent] == [1, 3, 5]
    assert consumer.commits == [{TP: 2}, {TP: 4}, {TP: 6}]
    assert consumer.seeks == [(TP, 6), (TP, 8)], "no offset moved past the refusals"


async def test_a_batch_fetched_ahead_goes_back_before_the_batch_that_did_not_land() -> None:
    polls: list[dict[TopicPartition, list[Record]] | BaseException] = [
        batch_of([b"bad", b"bad"], first=0),
        batch_of([b"ok", b"ok"], first=2),
    ]
    loop, consumer = loop_for(polls, RefusesBadRows(), StandInSink(), max_batch=2)
    await loop.run()
    assert consumer.commits == []
    # Fetched while the first batch failed to land, the second goes back first: the position
    # ends at the first batch's first offset, and nothing after it was skipped or committed.
    assert consumer.seeks == [(TP, 2), (TP, 0)]


async def test_a_consumer_without_a_dead_letter_sink_never_drops_a_refused_row() -> None:
    loop, consumer = loop_for([batch_of([b"ok", b"bad", b"ok"])], RefusesBadRows(), None)
    await loop.run()
    assert consumer.commits == []
    assert consumer.seeks == [(TP, 0)]


async def test_a_batch_that_does_not_land_is_fetched_again_never_committed() -> None:
    handler = RefusesBadRows(error=ConnectionRefusedError("database is down"))
    loop, consumer = loop_for([batch_of([b"ok"] * 5, first=20)], handler, StandInSink())
    await loop.run()
    assert handler.calls >= 2, "a transient failure is retried before giving up"
    assert consumer.seeks == [(TP, 20)]
    assert consumer.commits == []


async def test_a_month_without_its_partition_lands_the_batch_again_never_dead_letters() -> None:
    from llm_usage.consumers.usage.recorder import MonthWithoutPartitionError  # noqa: PLC0415

    handler = RefusesBadRows(error=MonthWithoutPartitionError("no partition for 2027-03"))
    loop, consumer = loop_for([batch_of([b"ok"])], handler, StandInSink())
    await loop.run()
    assert handler.calls >= 2
    assert consumer.commits == []


async def test_dead_letters_not_acknowledged_means_no_commit() -> None:
    loop, consumer = loop_for(
        [batch_of([b"ok", b"ok", b"bad"])], RefusesBadRows(), StandInSink(fail=True)
    )
    await loop.run()
    assert consumer.seeks == [(TP, 0)]
    assert consumer.commits == []


async def test_one_retry_budget_covers_the_database_and_the_dead_letters() -> None:
    # The database answers only after most of the budget; the DLQ is down. Separate budgets
    # would keep the batch twice as long as one; a shared one gives up at the deadline.
    class SlowThenOk(RefusesBadRows):
        async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
            self.calls += 1
            if self.calls < 3:
                raise ConnectionRefusedError("database is down")
            return await super().record_batch(records)

    loop, consumer = loop_for(
        [batch_of([b"ok", b"bad", b"ok"])], SlowThenOk(), StandInSink(fail=True), retry_seconds=1.0
    )
    started = asyncio.get_running_loop().time()
    await loop.run()
    assert asyncio.get_running_loop().time() - started < 1.9
    assert consumer.commits == []


async def test_a_batch_slower_than_the_rebalance_wait_never_commits_or_seeks() -> None:
    handler = RefusesBadRows(slow=0.5)
    loop, consumer = loop_for(
        [batch_of([b"ok"] * 3, first=40)], handler, StandInSink(), revoke_wait_seconds=0.05
    )

    async def rebalance_meanwhile() -> None:
        await asyncio.sleep(0.1)  # the batch is in flight
        await loop.listener.on_partitions_revoked({TP})
        # The partition comes straight back in the next generation, and its new position is
        # further on than this batch: a commit of 43 now would move the group backwards.
        await loop.listener.on_partitions_assigned({TP})

    await asyncio.gather(loop.run(), rebalance_meanwhile())
    assert consumer.commits == []
    assert consumer.seeks == []


async def test_a_batch_that_lands_within_the_rebalance_wait_commits_before_revocation() -> None:
    handler = RefusesBadRows(slow=0.2)
    loop, consumer = loop_for(
        [batch_of([b"ok"] * 3, first=40)], handler, StandInSink(), revoke_wait_seconds=5
    )

    async def rebalance_meanwhile() -> None:
        await asyncio.sleep(0.05)
        await loop.listener.on_partitions_revoked({TP})
        consumer.held = set()  # given away

    await asyncio.gather(loop.run(), rebalance_meanwhile())
    assert consumer.commits == [{TP: 43}]


async def test_a_batch_fetched_ahead_before_a_rebalance_is_left_to_the_new_owner() -> None:
    handler = RefusesBadRows(slow=0.3)
    loop, consumer = loop_for(
        [batch_of([b"ok"] * 4, first=40), batch_of([b"ok"] * 4, first=44)],
        handler,
        StandInSink(),
        max_batch=4,  # a full batch: the next is fetched ahead while it lands
        revoke_wait_seconds=5,
    )

    async def rebalance_meanwhile() -> None:
        await asyncio.sleep(0.1)  # the first batch is landing, the second fetched ahead
        await loop.listener.on_partitions_revoked({TP})
        consumer.held = set()  # given away

    await asyncio.gather(loop.run(), rebalance_meanwhile())
    # The first batch landed and was committed before the partition moved; the one fetched
    # ahead in the old assignment was not stored here (its new owner reads it from 44).
    assert consumer.commits == [{TP: 44}]
    assert handler.sizes == [4]


async def test_an_undecodable_partition_stops_at_its_offset_while_the_others_move_on() -> None:
    health = HealthState()
    polls: list[dict[TopicPartition, list[Record]] | BaseException] = [
        UnsupportedCodecError("Unknown compression codec 0x05"),
        {TP: [record(7, b"ok")], TP1: [record(3, b"ok", partition=1)]},
    ]
    loop, consumer = loop_for(polls, RefusesBadRows(), StandInSink(), health=health)
    health.started()
    consumer.held = {TP, TP1}
    consumer.failing = {TP1}
    await loop.run()
    assert consumer.paused_partitions == {TP1}
    assert consumer.commits == [{TP: 8}], "the healthy partition moved on; TP1 committed nothing"
    assert not health.ready
    assert "usage[1] stopped at offset 0: undecodable" in health.reason


async def test_shutdown_abandons_a_hanging_batch_after_its_grace() -> None:
    handler = RefusesBadRows(slow=60)  # a query waiting on a lock
    loop, consumer = loop_for(
        [batch_of([b"ok"] * 3, first=5)], handler, StandInSink(), shutdown_grace_seconds=0.3
    )
    asyncio.get_running_loop().call_later(0.2, consumer.stopping.set)
    started = asyncio.get_running_loop().time()
    await loop.run()
    assert asyncio.get_running_loop().time() - started < 2
    assert consumer.commits == []


async def test_the_next_batch_is_fetched_while_one_lands_and_committed_only_after_it_lands() -> (
    None
):
    polls: list[dict[TopicPartition, list[Record]] | BaseException] = [
        batch_of([b"ok", b"ok"], first=0),
        batch_of([b"ok"], first=2),
    ]
    events: list[str] = []

    class Recording(RefusesBadRows):
        async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
            events.append(f"landing {records[0].offset}")
            await asyncio.sleep(0.05)  # PostgreSQL at work: the loop fetches meanwhile
            outcome = await super().record_batch(records)
            events.append(f"landed {records[0].offset}")
            return outcome

    # Batches as large as asked for: the loop is behind, so it fetches ahead.
    loop, consumer = loop_for(polls, Recording(), StandInSink(), max_batch=2)
    getmany = consumer.getmany

    async def counting_getmany(*partitions: TopicPartition, **kwargs: Any) -> Any:
        events.append("fetch")
        return await getmany(*partitions, **kwargs)

    consumer.getmany = counting_getmany  # type: ignore[method-assign]
    commit = consumer.commit

    async def recording_commit(offsets: dict[TopicPartition, int]) -> None:
        events.append(f"commit {offsets[TP]}")
        await commit(offsets)

    consumer.commit = recording_commit  # type: ignore[method-assign]
    await loop.run()
    assert events[:7] == [
        "fetch",
        "landing 0",
        "fetch",  # the second batch, fetched while the first lands
        "landed 0",
        "commit 2",
        "landing 2",
        "fetch",
    ]
    assert events.index("commit 3") > events.index("landed 2")
    assert consumer.commits == [{TP: 2}, {TP: 3}]


class PreparesAheadRecording(RefusesBadRows):
    """Remembers which record lists it was asked to prepare and which it was asked to land."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prepared: list[Sequence[Record]] = []
        self.landed: list[Sequence[Record]] = []

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        self.prepared.append(records)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        self.landed.append(records)
        await asyncio.sleep(0.02)
        return await super().record_batch(records)


async def test_a_batch_fetched_ahead_is_handed_to_the_handler_to_prepare_then_to_land() -> None:
    polls: list[dict[TopicPartition, list[Record]] | BaseException] = [
        batch_of([b"ok", b"ok"], first=0),
        batch_of([b"ok", b"ok"], first=2),
        batch_of([b"ok"], first=4),
    ]
    handler = PreparesAheadRecording()
    loop, consumer = loop_for(polls, handler, StandInSink(), max_batch=2)
    await loop.run()
    # The very lists it prepared are the ones it was then asked to land (first batch: nothing
    # was in hand, so nothing was fetched ahead of it).
    assert [[r.offset for r in batch] for batch in handler.landed] == [[0, 1], [2, 3], [4]]
    assert [id(batch) for batch in handler.prepared] == [id(b) for b in handler.landed[1:]]
    assert consumer.commits == [{TP: 2}, {TP: 4}, {TP: 5}]


async def test_a_batch_prepared_ahead_of_one_that_did_not_land_is_sent_back_not_landed() -> None:
    polls: list[dict[TopicPartition, list[Record]] | BaseException] = [
        batch_of([b"ok", b"ok"], first=0),
        batch_of([b"ok", b"ok"], first=2),
    ]
    handler = PreparesAheadRecording(error=asyncpg.exceptions.DeadlockDetectedError("deadlock"))
    loop, consumer = loop_for(polls, handler, StandInSink(), max_batch=2, retry_seconds=0.05)
    await loop.run()
    assert [[r.offset for r in batch] for batch in handler.prepared] == [[2, 3]]
    assert all(landed is not handler.prepared[0] for landed in handler.landed)
    assert (TP, 2) in consumer.seeks  # fetched again from its first offset, by a new poll
    assert consumer.commits == []
