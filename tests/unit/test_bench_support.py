"""The benches' clock on a consumer run in-process: from its first landing to its last offset
commit, read from outside the runtime (its handler and its batch-duration histogram)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llm_usage.bench.support import LandingClock
from llm_usage.runtime.ahead import PreparesAhead
from llm_usage.runtime.handler import BatchOutcome, Record
from llm_usage.runtime.metrics import ConsumerMetrics


class _Handler:
    def __init__(self) -> None:
        self.prepared: list[Sequence[Record]] = []
        self.calls = 0

    def prepare_ahead(self, records: Sequence[Record]) -> None:
        self.prepared.append(records)

    async def record_batch(self, records: Sequence[Record]) -> BatchOutcome:
        self.calls += 1
        return BatchOutcome()


async def test_the_clock_runs_from_the_first_landing_to_the_last_commit() -> None:
    metrics = ConsumerMetrics.create(CollectorRegistry())
    committed = metrics.batch_duration.labels("usage")  # what the loop observes per landing
    handler = _Handler()
    clock = LandingClock(handler, metrics.batch_duration, "usage")
    assert clock.busy_seconds() is None

    before_first = time.perf_counter()
    await clock.record_batch([])
    committed.observe(0.5)
    await clock.record_batch([])
    after_last = time.perf_counter()
    await asyncio.sleep(0.05)
    await clock.record_batch([])  # the same landing again (a retry): not a new one
    committed.observe(0.25)

    busy = clock.busy_seconds()
    assert busy is not None
    # Counting the retry as a landing would start the last one 0.05 s later than this allows.
    assert 0.25 <= busy <= after_last - before_first + 0.25
    assert handler.calls == 3


def test_the_clock_hands_batches_prepared_ahead_to_the_handler() -> None:
    handler = _Handler()
    clock = LandingClock(handler, ConsumerMetrics.create(CollectorRegistry()).batch_duration, "u")
    assert isinstance(clock, PreparesAhead)
    records: list[Record] = []
    clock.prepare_ahead(records)
    assert handler.prepared == [records]
