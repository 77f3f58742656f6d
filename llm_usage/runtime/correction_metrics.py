"""Prometheus metrics of corrections (`llm_usage_corrected`), the same names in the usage and the
budget consumer, told apart by their `consumer` label."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

# What became of a correction: `applied` (it moved what it had to), `duplicate` (seen before),
# `conflict` (its id re-used with other content), `deferred` (parked until its event is stored,
# or counted), `unknown` (no event within the wait: dead-lettered, or dropped by the budget
# consumer), `superseded` (applied as history, but a later correction already wins).
CORRECTION_RESULTS = ("applied", "duplicate", "conflict", "deferred", "unknown", "superseded")


@dataclass(frozen=True)
class CorrectionMetrics:
    results: Counter
    waiting: Gauge
    oldest_wait: Gauge
    slow_lookups: Counter
    consumer: str

    def count(self, result: str, n: int = 1) -> None:
        if n:
            self.results.labels(consumer=self.consumer, result=result).inc(n)


def correction_metrics(registry: CollectorRegistry, consumer: str) -> CorrectionMetrics:
    """The correction metrics of `consumer` (usage or budget), registered in `registry`, each
    result present at 0 from the start so that rates and alerts see the series."""
    metrics = CorrectionMetrics(
        results=Counter(
            "llm_usage_corrections_total",
            "Corrections handled, by result: applied, duplicate, conflict, deferred, unknown, "
            "superseded.",
            ["consumer", "result"],
            registry=registry,
        ),
        waiting=Gauge(
            "llm_usage_corrections_waiting",
            "Corrections parked, waiting for their event (usage) or for the usage consumer's "
            "verdict and the event's count (budget).",
            ["consumer"],
            registry=registry,
        ),
        oldest_wait=Gauge(
            "llm_usage_correction_oldest_wait_seconds",
            "Age of the oldest parked correction, 0 when none waits.",
            ["consumer"],
            registry=registry,
        ),
        slow_lookups=Counter(
            "llm_usage_corrections_slow_lookups_total",
            "Corrections whose event was past the id window and sent no event_occurred_at: "
            "found by walking the tenant's events.",
            ["consumer"],
            registry=registry,
        ),
        consumer=consumer,
    )
    for result in CORRECTION_RESULTS:
        metrics.results.labels(consumer=consumer, result=result)
    metrics.waiting.labels(consumer=consumer).set(0)
    metrics.oldest_wait.labels(consumer=consumer).set(0)
    metrics.slow_lookups.labels(consumer=consumer)
    return metrics
