"""A batch prepared ahead is handed over only for the very batch it was prepared for."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llm_usage.runtime.ahead import PreparedAhead
from llm_usage.runtime.handler import Record
from tests.records import consumer_record


def batch(*offsets: int) -> list[Record]:
    return [consumer_record(b"{}", offset=offset) for offset in offsets]


class Preparing:
    def __init__(self) -> None:
        self.started: list[list[int]] = []
        self.finished: list[list[int]] = []

    async def __call__(self, records: Sequence[Record]) -> list[int]:
        offsets = [r.offset for r in records]
        self.started.append(offsets)
        await asyncio.sleep(0.01)
        self.finished.append(offsets)
        return offsets


async def test_the_batch_prepared_is_handed_over_once_for_that_very_list() -> None:
    preparing = Preparing()
    ahead = PreparedAhead(preparing)
    records = batch(1, 2)
    ahead.start(records)
    assert await ahead.take(records) == [1, 2]
    assert await ahead.take(records) is None  # handed over once
    assert preparing.started == [[1, 2]]


async def test_an_equal_but_other_list_is_not_the_batch_prepared() -> None:
    preparing = Preparing()
    ahead = PreparedAhead(preparing)
    ahead.start(batch(1, 2))
    assert await ahead.take(batch(1, 2)) is None
    await asyncio.sleep(0.03)
    assert preparing.finished == []  # the preparation not wanted was cancelled


async def test_a_new_start_or_a_discard_cancels_the_preparation_before() -> None:
    preparing = Preparing()
    ahead = PreparedAhead(preparing)
    first, second = batch(1), batch(2)
    ahead.start(first)
    await asyncio.sleep(0)
    ahead.start(second)
    assert await ahead.take(first) is None
    ahead.start(second)
    await asyncio.sleep(0)
    ahead.discard()
    assert await ahead.take(second) is None
    await asyncio.sleep(0.03)
    assert preparing.finished == []
