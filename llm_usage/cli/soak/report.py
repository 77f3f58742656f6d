"""The soak's report for people: figures, the checker's table, and a chart of the run."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_usage.cli.soak.ledger import Ledger
from llm_usage.cli.soak.timeline import AlertArrival, CheckReport, FaultMark, Sample

_COLOURS = {
    "sigkill": "tab:red",
    "sigterm": "tab:orange",
    "sigstop": "tab:purple",
    "broker_restart": "tab:brown",
    "postgres_restart": "tab:blue",
    "policy_lowered": "tab:green",
    "unplanned_exit": "black",
}


@dataclass(frozen=True)
class AlertLatency:
    count: int
    p50: float
    p99: float
    max: float

    def text(self) -> str:
        return (
            f"{self.count} alerts, p50 {self.p50:.2f} s, p99 {self.p99:.2f} s, max {self.max:.2f} s"
        )


def alert_latencies(alerts: Sequence[AlertArrival], ledger: Ledger) -> list[tuple[float, float]]:
    """(when the triggering event was acknowledged, seconds until its alert arrived)."""
    found = []
    for alert in alerts:
        event = ledger.events.get(alert.triggered_by or "")
        if event is not None:
            found.append((event.acked_at, max(alert.arrived_at - event.acked_at, 0.0)))
    return found


def latency_summary(latencies: Sequence[float]) -> AlertLatency | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return AlertLatency(
        count=len(ordered),
        p50=statistics.median(ordered),
        p99=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        max=ordered[-1],
    )


def under_fault(
    latencies: Sequence[tuple[float, float]],
    faults: Sequence[FaultMark],
    *,
    run_start: float,
    window: float = 30.0,
) -> list[float]:
    """Latencies of alerts whose triggering event came within `window` s after a fault."""
    starts = [run_start + fault.t for fault in faults]
    return [
        latency
        for acked_at, latency in latencies
        if any(0 <= acked_at - start <= window for start in starts)
    ]


def rates(samples: Sequence[Sample]) -> dict[str, list[tuple[float, float | None]]]:
    """Events/s per interval between samples, for the generator and each consumer group."""
    series: dict[str, list[tuple[float, float | None]]] = {
        "published": [],
        "usage consumers": [],
        "budget consumers": [],
    }
    for before, after in itertools.pairwise(samples):
        span = after.t - before.t
        if span <= 0:
            continue
        for name, first, second in (
            ("published", before.published, after.published),
            ("usage consumers", before.usage_committed, after.usage_committed),
            ("budget consumers", before.budget_committed, after.budget_committed),
        ):
            value = None if first is None or second is None else max(second - first, 0) / span
            series[name].append((after.t, value))
    return series


def lag_peaks(samples: Sequence[Sample]) -> dict[str, tuple[int, float]]:
    peaks: dict[str, tuple[int, float]] = {}
    for sample in samples:
        for group, lag in (("usage", sample.usage_lag), ("budget", sample.budget_lag)):
            if lag is not None and lag >= peaks.get(group, (-1, 0.0))[0]:
                peaks[group] = (lag, sample.t)
    return peaks


def render_chart(path: Path, *, samples: Sequence[Sample], faults: Sequence[FaultMark]) -> None:
    import matplotlib  # noqa: PLC0415 - only the soak draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), dpi=100, sharex=True)
    for name, series in rates(samples).items():
        top.plot(
            [t for t, _ in series],
            [v if v is not None else float("nan") for _, v in series],
            label=name,
        )
    top.set_ylabel("events/s")
    top.legend(loc="upper left")
    for group, attribute in (("usage", "usage_lag"), ("budget", "budget_lag")):
        values = [getattr(sample, attribute) for sample in samples]
        bottom.plot(
            [sample.t for sample in samples],
            [v if v is not None else float("nan") for v in values],
            label=f"{group} consumer lag",
        )
    bottom.set_ylabel("records behind")
    bottom.set_xlabel("seconds since the load started")
    seen: set[str] = set()
    for fault in faults:
        colour = _COLOURS.get(fault.kind, "grey")
        for axis in (top, bottom):
            axis.axvline(
                fault.t,
                color=colour,
                linestyle="--",
                linewidth=1,
                label=fault.kind if axis is bottom and fault.kind not in seen else None,
            )
        seen.add(fault.kind)
        top.annotate(
            fault.target[:18],
            (fault.t, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="top",
            color=colour,
        )
    bottom.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def summary_lines(
    *,
    samples: Sequence[Sample],
    faults: Sequence[FaultMark],
    alerts: Sequence[AlertArrival],
    ledger: Ledger,
    check: CheckReport,
    run_start: float,
) -> list[str]:
    """The short plain-text answer the command prints at the end."""
    latencies = alert_latencies(alerts, ledger)
    overall = latency_summary([latency for _, latency in latencies])
    faulted = latency_summary(under_fault(latencies, faults, run_start=run_start))
    published = [rate for _, rate in rates(samples)["published"] if rate is not None]
    kinds = Counter(fault.kind for fault in faults)
    lines = [
        "PASSED: every check held" if check.ok else "FAILED: a check did not hold",
        f"records acknowledged: {sum(ledger.sent.values()) - ledger.sent['retried_send']} "
        f"({', '.join(f'{k} {n}' for k, n in sorted(ledger.sent.items()))})",
        f"valid events: {len(ledger.events)}; aborted ids: {len(ledger.aborted_ids)}",
        "published: "
        + (
            f"mean {statistics.mean(published):.0f} events/s, peak {max(published):.0f}"
            if published
            else "no samples"
        ),
        f"faults: {', '.join(f'{k} {n}' for k, n in sorted(kinds.items())) or 'none'}",
        "lag peaks: "
        + (
            ", ".join(
                f"{g} {lag} records at t={t:.0f} s" for g, (lag, t) in lag_peaks(samples).items()
            )
            or "none"
        ),
        f"alert latency: {overall.text() if overall else 'no alerts'}",
        f"alert latency within 30 s after a fault: {faulted.text() if faulted else 'no alerts'}",
    ]
    lines += [f"  {'ok  ' if row.ok else 'FAIL'} {row.name}: {row.found}" for row in check.rows]
    return lines


def render_markdown(
    *,
    title: str,
    plan_lines: Sequence[str],
    summary: Sequence[str],
    faults: Sequence[FaultMark],
    check: CheckReport,
    chart_name: str,
) -> str:
    out = [f"# {title}", "", f"**{summary[0]}**", "", "## Figures", ""]
    out += [f"- {line}" for line in summary[1:] if not line.startswith("  ")]
    out += [
        "",
        "## Checks",
        "",
        "| check | expected | found | ok | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in check.rows:
        detail = row.detail.replace("|", "/")
        ok = "yes" if row.ok else "**NO**"
        out.append(f"| {row.name} | {row.expected} | {row.found} | {ok} | {detail} |")
    out += ["", f"![events/s and consumer lag, with the faults]({chart_name})", "", "## Faults", ""]
    out += ["| t (s) | kind | target | what happened |", "| ---: | --- | --- | --- |"]
    out += [f"| {f.t:.1f} | {f.kind} | {f.target} | {f.detail} |" for f in faults]
    out += ["", "## Plan", "", "```", *plan_lines, "```", ""]
    return "\n".join(out)


def write_report(
    directory: Path,
    *,
    title: str,
    plan_lines: Sequence[str],
    samples: Sequence[Sample],
    faults: Sequence[FaultMark],
    alerts: Sequence[AlertArrival],
    ledger: Ledger,
    check: CheckReport,
    run_start: float,
    duration_s: float,
) -> Path:
    del duration_s
    directory.mkdir(parents=True, exist_ok=True)
    render_chart(directory / "soak.png", samples=samples, faults=faults)
    summary = summary_lines(
        samples=samples,
        faults=faults,
        alerts=alerts,
        ledger=ledger,
        check=check,
        run_start=run_start,
    )
    report = directory / "report.md"
    report.write_text(
        render_markdown(
            title=title,
            plan_lines=plan_lines,
            summary=summary,
            faults=faults,
            check=check,
            chart_name="soak.png",
        )
    )
    return report
