"""`--exit-when-idle`: stop once at the end of every held partition for long enough."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IllegalStateError


class IdleDetector:
    def __init__(self, consumer: AIOKafkaConsumer, *, idle_seconds: float | None) -> None:
        self._consumer = consumer
        self._idle_seconds = idle_seconds
        self._idle_since: float | None = None

    def busy(self) -> None:
        self._idle_since = None

    async def idle_long_enough(self) -> bool:
        if self._idle_seconds is None:
            return False
        if not await self._at_end_of_every_partition():
            self._idle_since = None
            return False
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self._idle_seconds

    async def _at_end_of_every_partition(self) -> bool:
        assigned = self._consumer.assignment()
        if not assigned or self._consumer.paused():  # a stopped partition is never "done"
            return False
        try:
            for tp in assigned:
                highwater = self._consumer.highwater(tp)
                if highwater is None or await self._consumer.position(tp) < highwater:
                    return False
        except (IllegalStateError, AssertionError):  # revoked while we looked: not idle yet
            return False
        return True
