"""Prometheus metrics of a batch consumer; the registry is passed in, never a global."""

from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ConsumerMetrics:
        return cls(
            events=Counter(
                "llm_usage_consumer_events_total",
                "Records handled, by result: recorded, duplicate, conflict, dead_lettered.",
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
                "Records between the committed offset and the partition's high watermark.",
                ["consumer", "topic", "partition"],
                registry=registry,
            ),
            retries=Counter(
                "llm_usage_consumer_retries_total",
                "Retries of a batch after a transient failure, by the operation that failed.",
                ["consumer", "operation"],
                registry=registry,
            ),
        )
