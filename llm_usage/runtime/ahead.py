"""A batch's records prepared (decoded) while the batch before it lands.

The loop hands a handler the records it fetched ahead; the handler starts preparing them at
once, so its CPU work overlaps the waits of the batch in hand (its last write, its commit, the
offset commit). Preparing must be pure (no effect outside the process): a batch prepared ahead
may be thrown away, when the batch before it does not land or the partitions move.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

from llm_usage.runtime.handler import Record

Prepared = TypeVar("Prepared")


@runtime_checkable
class PreparesAhead(Protocol):
    """A batch handler that can start on the next batch before it is asked to land it."""

    def prepare_ahead(self, records: Sequence[Record]) -> None: ...


class PreparedAhead(Generic[Prepared]):
    """At most one batch prepared ahead, handed over only for that very batch (the same list)."""

    def __init__(self, prepare: Callable[[Sequence[Record]], Awaitable[Prepared]]) -> None:
        self._prepare = prepare
        self._records: Sequence[Record] | None = None
        self._task: asyncio.Future[Prepared] | None = None

    def start(self, records: Sequence[Record]) -> None:
        self.discard()
        self._records = records
        self._task = asyncio.ensure_future(self._prepare(records))

    async def take(self, records: Sequence[Record]) -> Prepared | None:
        """What was prepared for `records`, or None when something else was (then dropped)."""
        task, prepared_for = self._task, self._records
        self._task = self._records = None
        if task is None:
            return None
        if prepared_for is not records:
            task.cancel()  # cancel() also tells asyncio that whatever it raised is not wanted
            return None
        return await task

    def discard(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = self._records = None
