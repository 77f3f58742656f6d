"""Metrics of the budget consumer beside the runtime's: alerts, the outbox, the relay."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class BudgetMetrics:
    alerts_published: Counter
    outbox_backlog: Gauge
    outbox_oldest_age: Gauge
    alert_latency: Histogram
    relay_leader: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BudgetMetrics:
        return cls(
            alerts_published=Counter(
                "llm_usage_budget_alerts_published_total",
                "Budget alerts published to the alerts topic, by level.",
                ["level"],
                registry=registry,
            ),
            outbox_backlog=Gauge(
                "llm_usage_budget_alert_outbox_backlog",
                "Alerts decided but not yet published (as the relay last saw it).",
                registry=registry,
            ),
            outbox_oldest_age=Gauge(
                "llm_usage_budget_alert_outbox_oldest_age_seconds",
                "Age of the oldest alert not yet published; 0 when none waits.",
                registry=registry,
            ),
            alert_latency=Histogram(
                "llm_usage_budget_alert_latency_seconds",
                "From the transaction that decided an alert to the broker acknowledging it.",
                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                registry=registry,
            ),
            relay_leader=Gauge(
                "llm_usage_budget_alert_relay_leader",
                "1 on the one replica that publishes alerts, 0 on the others.",
                registry=registry,
            ),
        )
