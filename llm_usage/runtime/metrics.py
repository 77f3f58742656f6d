"""Prometheus metrics of a batch consumer; the registry is passed in, never a global."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class ConsumerMetrics:
    """The metrics every consumer exposes, labelled by `consumer` (usage, budget, ...)."""

    events: Counter
    dead_letters: Counter
    batch_size: Histogram
    batch_duration: Histogram
    lag: Gauge
    retries: Counter
    undecodable_batches: Counter
    stopped_partitions: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ConsumerMetrics:
        return cls(
            events=Counter(
                "llm_usage_consumer_events_total",
                "Records handled, by result: recorded, duplicate, conflict, dead_lettered, "
                "refused_by_database.",
                ["consumer", "result"],
                registry=registry,
            ),
            dead_letters=Counter(
                "llm_usage_consumer_dead_letters_total",
                "Records sent to the dead-letter topic, by reason.",
                ["consumer", "reason"],
                registry=registry,
            ),
            batch_size=Histogram(
                "llm_usage_consumer_batch_size",
                "Records per batch.",
                ["consumer"],
                buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000),
                registry=registry,
            ),
            batch_duration=Histogram(
                "llm_usage_consumer_batch_duration_seconds",
                "Time from a batch being fetched to its offsets being committed.",
                ["consumer"],
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                registry=registry,
            ),
            lag=Gauge(
                "llm_usage_consumer_lag",
                "Records between this member's last committed offset (its fetch position until "
                "its first commit, or its position past commit markers once all is committed) "
                "and the partition's last stable offset.",
                ["consumer", "topic", "partition"],
                registry=registry,
            ),
            retries=Counter(
                "llm_usage_consumer_retries_total",
                "Retries of a batch after a transient failure, by the operation that failed.",
                ["consumer", "operation"],
                registry=registry,
            ),
            undecodable_batches=Counter(
                "llm_usage_consumer_undecodable_batches_total",
                "Fetches that hit a record batch the consumer cannot decode (corrupt, or a codec "
                "it lacks); the partition stops there until it can be read.",
                ["consumer", "topic", "partition"],
                registry=registry,
            ),
            stopped_partitions=Gauge(
                "llm_usage_consumer_stopped_partitions",
                "Partitions this member holds but does not read: stopped at a batch it cannot "
                "decode. Anything above 0 needs a person (see docs/operations.md).",
                ["consumer"],
                registry=registry,
            ),
        )

    def forget_partition(self, consumer: str, tp: TopicPartition) -> None:
        """A revoked partition's lag is its next owner's to report."""
        with contextlib.suppress(KeyError):  # no lag was reported for it yet
            self.lag.remove(consumer, tp.topic, str(tp.partition))
