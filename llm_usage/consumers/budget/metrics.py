"""Metrics of the budget consumer beside the runtime's: alerts, the outbox, the relay, the
gateway's holds (settled in the batch, expired by the sweeper) and corrections."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llm_usage.domain.holds import EXPIRED, SETTLED, SETTLED_LATE
from llm_usage.runtime.correction_metrics import CorrectionMetrics, correction_metrics


@dataclass(frozen=True)
class BudgetMetrics:
    alerts_published: Counter
    outbox_backlog: Gauge
    outbox_oldest_age: Gauge
    alert_latency: Histogram
    relay_leader: Gauge
    holds: HoldMetrics
    corrections: CorrectionMetrics

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
            holds=HoldMetrics.create(registry),
            corrections=correction_metrics(registry, "budget"),
        )


# Every label value is served from the start (at 0): the alert rules divide and compare rates
# of these series, and a series that appears only with its first increment hides that increment.
HOW_HOLDS_END = (SETTLED, EXPIRED, SETTLED_LATE)
SWEEP_RESULTS = ("swept", "skipped", "failed")


@dataclass(frozen=True)
class HoldMetrics:
    """Budget checks' holds as the budget consumer ends them (design §9)."""

    ended: Counter
    overshoot: Counter
    overshoot_usd: Counter
    period_mismatch: Counter
    sweeps: Counter
    sweep_duration: Histogram
    open_holds: Gauge
    oldest_open_age: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HoldMetrics:
        metrics = cls(
            ended=Counter(
                "llm_usage_budget_holds_ended_total",
                "Holds ended, by how: settled (its event counted in a batch), expired (by the "
                "sweeper), settled_late (by the sweeper, its event found counted).",
                ["how"],
                registry=registry,
            ),
            overshoot=Counter(
                "llm_usage_budget_hold_overshoot_total",
                "Settled holds whose event charged more than the amount held.",
                registry=registry,
            ),
            overshoot_usd=Counter(
                "llm_usage_budget_hold_overshoot_usd_total",
                "US dollars charged beyond the amounts held, summed over the settled holds.",
                registry=registry,
            ),
            period_mismatch=Counter(
                "llm_usage_budget_hold_period_mismatch_total",
                "Settled holds whose event counted in another UTC day or month than the hold.",
                registry=registry,
            ),
            sweeps=Counter(
                "llm_usage_budget_hold_sweeps_total",
                "Hold sweeper rounds, by result: swept, skipped (another replica swept), failed.",
                ["result"],
                registry=registry,
            ),
            sweep_duration=Histogram(
                "llm_usage_budget_hold_sweep_duration_seconds",
                "Duration of the hold sweeper's rounds that swept.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=registry,
            ),
            open_holds=Gauge(
                "llm_usage_budget_holds_open",
                "Open holds after the last sweep of this replica.",
                registry=registry,
            ),
            oldest_open_age=Gauge(
                "llm_usage_budget_hold_oldest_open_age_seconds",
                "Age of the oldest open hold after the last sweep of this replica; 0 when none.",
                registry=registry,
            ),
        )
        for how in HOW_HOLDS_END:
            metrics.ended.labels(how)
        for result in SWEEP_RESULTS:
            metrics.sweeps.labels(result)
        return metrics
