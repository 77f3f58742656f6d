"""What happens when the group moves partitions: the batch in flight may land and commit first,
then the generation ends so that a batch slower than the wait can no longer commit or seek."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeAlias

import structlog
from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from llm_usage.runtime.metrics import ConsumerMetrics
from llm_usage.runtime.offsets import OffsetLedger
from llm_usage.runtime.probes import HealthState

log = structlog.get_logger(__name__)

# Anything else that keeps per-partition state (stopped partitions) hears of revocations.
RevokedHook: TypeAlias = Callable[[set[TopicPartition]], None]


def partition_names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(
        self,
        *,
        name: str,
        ledger: OffsetLedger,
        batch_done: asyncio.Event,
        metrics: ConsumerMetrics,
        health: HealthState,
        revoke_wait_seconds: float,
    ) -> None:
        self._name = name
        self._ledger = ledger
        self._batch_done = batch_done
        self._metrics = metrics
        self._health = health
        self._revoke_wait_seconds = revoke_wait_seconds
        self.revoked_listeners: list[RevokedHook] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before giving partitions away, let the batch in flight land and commit it; no
        batch fetched before now lands after it."""
        self._ledger.begin_revocation()
        try:
            try:
                await asyncio.wait_for(self._batch_done.wait(), self._revoke_wait_seconds)
            except TimeoutError:
                log.warning(
                    "Rebalance did not wait for a slow batch; it will be redelivered to the "
                    "partitions' next owner and never committed by this one.",
                    consumer=self._name,
                )
            await self._ledger.commit()
        finally:
            self._ledger.end_generation()
        self._ledger.forget(revoked)
        for hook in self.revoked_listeners:
            hook(revoked)
        for tp in revoked:
            self._metrics.forget_partition(self._name, tp)
        if revoked:
            log.info(
                "Partitions revoked.", consumer=self._name, partitions=partition_names(revoked)
            )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # An empty assignment is a standby replica (more replicas than partitions): it has joined
        # the group and is ready to take partitions over.
        self._health.started()
        log.info("Partitions assigned.", consumer=self._name, partitions=partition_names(assigned))
