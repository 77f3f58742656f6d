"""The soak's report for people: figures, the checker's table, and a chart of the run.

Everything but `render_chart` and `write_report` is pure: plain values in, numbers or text out.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Imported with the module, not when the chart is drawn: a missing soak extra then stops the soak
# before it starts (one line naming the extra) instead of after twenty minutes of load.
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llm_usage.soak.ledger import Ledger
from llm_usage.soak.timeline import AlertArrival, CheckReport, FaultMark, Sample

CHART_NAME = "soak.png"
REPORT_NAME = "report.md"
# An alert counts as "under fault" when its triggering event was acknowledged this soon after one.
FAULT_WINDOW_S = 30.0
# A partition's group offset standing still this long (three samples) with records waiting is a
# stall; shorter pauses are a batch landing on a loaded machine.
MIN_STALL_S = 3.0
# The series `rates` returns, with the Sample attribute each is computed from.
_SERIES = {
    "published": "published",
    "usage consumers": "usage_committed",
    "budget consumers": "budget_committed",
}
# Solid series lines in colours no fault kind uses, the same colour for a group on both panels.
_SERIES_COLOURS = {
    "published": "dimgray",
    "usage consumers": "tab:cyan",
    "budget consumers": "tab:olive",
}
_COLOURS = {
    "sigkill": "tab:red",
    "sigterm": "tab:orange",
    "sigstop": "tab:purple",
    "broker_restart": "tab:brown",
    "postgres_restart": "tab:blue",
    "policy_lowered": "tab:green",
    "unplanned_exit": "black",
}
# A failed send the generator repeated: counted in `Ledger.sent`, but not a record on the topic.
_RETRIED = "retried_send"
# The checker's row whose `found` says how many events were stored.
_STORED_CHECK_PREFIX = "events stored"


@dataclass(frozen=True)
class AlertLatency:
    """Seconds from the triggering event's acknowledgement to its alert's arrival."""

    count: int
    p50: float
    p99: float
    max: float

    def text(self) -> str:
        return (
            f"{self.count} alerts, p50 {self.p50:.2f} s, p99 {self.p99:.2f} s, max {self.max:.2f} s"
        )


@dataclass(frozen=True)
class RateFigure:
    """One series' events/s: the average over the load, the peak over the whole run and when."""

    average: float | None
    peak: float | None
    peak_at: float | None


def alert_latencies(alerts: Sequence[AlertArrival], ledger: Ledger) -> list[tuple[float, float]]:
    """(when the triggering event was acknowledged, seconds until its alert arrived), for every
    alert whose triggering event the generator sent."""
    found = []
    for alert in alerts:
        event = ledger.events.get(alert.triggered_by or "")
        if event is not None:
            # A transaction's records are readable once its commit markers are written, a moment
            # before `commit_transaction` returns to the generator: never show that as negative.
            found.append((event.acked_at, max(alert.arrived_at - event.acked_at, 0.0)))
    return found


def _nearest_rank(ordered: Sequence[float], fraction: float) -> float:
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def latency_summary(latencies: Sequence[float]) -> AlertLatency | None:
    """Count, p50, p99 (nearest rank: always a latency that was observed) and max; None if none."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    return AlertLatency(
        count=len(ordered),
        p50=_nearest_rank(ordered, 0.50),
        p99=_nearest_rank(ordered, 0.99),
        max=ordered[-1],
    )


def under_fault(
    latencies: Sequence[tuple[float, float]],
    faults: Sequence[FaultMark],
    *,
    run_start: float,
    window: float = FAULT_WINDOW_S,
) -> list[float]:
    """The latencies whose triggering event was acknowledged within `window` s after a fault
    (`FaultMark.t` counts from `run_start`, a Unix time like `acked_at`)."""
    starts = [run_start + fault.t for fault in faults]
    return [
        latency
        for acked_at, latency in latencies
        if any(0.0 <= acked_at - start <= window for start in starts)
    ]


def rates(samples: Sequence[Sample]) -> dict[str, list[tuple[float, float | None]]]:
    """Events/s over each interval between samples, at the interval's end, for the generator and
    each consumer group; None where either end of the interval has no value (a gap)."""
    series: dict[str, list[tuple[float, float | None]]] = {name: [] for name in _SERIES}
    for before, after in itertools.pairwise(samples):
        span = after.t - before.t
        if span <= 0:
            continue
        for name, attribute in _SERIES.items():
            first, second = getattr(before, attribute), getattr(after, attribute)
            value = None if first is None or second is None else max(second - first, 0) / span
            series[name].append((after.t, value))
    return series


def rate_figures(samples: Sequence[Sample], *, load_seconds: float) -> dict[str, RateFigure]:
    """Per series: the average over the load (first to last known value up to `load_seconds`,
    so the drain does not dilute it) and the peak interval over the whole run."""
    figures = {}
    for name, attribute in _SERIES.items():
        known = [
            (sample.t, value)
            for sample in samples
            if sample.t <= load_seconds and (value := getattr(sample, attribute)) is not None
        ]
        average = None
        if len(known) >= 2 and known[-1][0] > known[0][0]:
            average = (known[-1][1] - known[0][1]) / (known[-1][0] - known[0][0])
        measured = [(rate, t) for t, rate in rates(samples)[name] if rate is not None]
        peak, peak_at = max(measured, key=lambda pair: pair[0]) if measured else (None, None)
        figures[name] = RateFigure(average, peak, peak_at)
    return figures


def lag_peaks(samples: Sequence[Sample]) -> dict[str, tuple[int, float]]:
    """Consumer group ("usage", "budget") -> (its largest lag in records, the first time it was
    that far behind); a group never measured is absent."""
    peaks: dict[str, tuple[int, float]] = {}
    for sample in samples:
        for group, lag in (("usage", sample.usage_lag), ("budget", sample.budget_lag)):
            if lag is not None and (group not in peaks or lag > peaks[group][0]):
                peaks[group] = (lag, sample.t)
    return peaks


@dataclass(frozen=True)
class Stall:
    """A partition whose group offset stood still while records waited on it: from the last
    sample that saw it move to the first that saw it move again (None: not before the end)."""

    group: str
    partition: int
    start: float
    end: float | None

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass(frozen=True)
class Recovery:
    """What one fault cost: per consumer group, seconds from the fault until every partition of
    the group moved again (0.0: none stood still for MIN_STALL_S), None if one never did before
    the samples ended; and the alerts triggered within FAULT_WINDOW_S after it."""

    fault: FaultMark
    moving_after: dict[str, float | None]
    alerts: AlertLatency | None
    # Per group, the partitions that stood still in the window (a killed replica's own, when
    # the other replica kept moving).
    stalled: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def text(self) -> str:
        groups = ", ".join(
            f"{group} {_recovery_text(seconds)}{_stalled_text(self.stalled.get(group, ()))}"
            for group, seconds in self.moving_after.items()
        )
        return (
            f"t={self.fault.t:.1f} s {self.fault.kind} {_short_target(self.fault.target)}: "
            f"every partition moving again after: {groups}; alerts within "
            f"{FAULT_WINDOW_S:.0f} s: {_latency_text(self.alerts)}"
        )


def _stalled_text(partitions: tuple[int, ...]) -> str:
    return f" (partitions {', '.join(map(str, partitions))} stood still)" if partitions else ""


def _recovery_text(seconds: float | None) -> str:
    if seconds is None:
        return "not before the end"
    if seconds == 0.0:
        return f"never stopped ({MIN_STALL_S:.0f} s resolution)"
    return f"{seconds:.1f} s"


def stalls(samples: Sequence[Sample], group: str) -> list[Stall]:
    """Every stall of at least MIN_STALL_S of `group` ("usage", "budget") on any partition.

    A partition with nothing waiting (its end reached) is idle, not stalled. Samples where the
    cluster did not answer are skipped: a stall spans them until a sample sees it move."""
    width = max((len(s.partition_ends) for s in samples if s.partition_ends), default=0)
    found: list[Stall] = []
    for partition in range(width):
        last: int | None = None
        waiting_since: float | None = None
        last_t = 0.0
        for sample in samples:
            committed, ends = sample.partitions_of(group), sample.partition_ends
            if committed is None or ends is None or partition >= min(len(committed), len(ends)):
                continue
            value, last_t = committed[partition], sample.t
            if last is not None and value != last:
                if waiting_since is not None and sample.t - waiting_since >= MIN_STALL_S:
                    found.append(Stall(group, partition, waiting_since, sample.t))
                waiting_since = None
            last = value
            if ends[partition] > value and waiting_since is None:
                waiting_since = sample.t
        if waiting_since is not None and last_t - waiting_since >= MIN_STALL_S:
            found.append(Stall(group, partition, waiting_since, None))
    return found


def recoveries(
    samples: Sequence[Sample],
    faults: Sequence[FaultMark],
    latencies: Sequence[tuple[float, float]],
    *,
    run_start: float,
    window: float = FAULT_WINDOW_S,
) -> list[Recovery]:
    """Per fault: the stalls under way within `window` s after it (whatever began them), and
    when the last of them ended; the latency of alerts triggered in that window."""
    by_group = {group: stalls(samples, group) for group in ("usage", "budget")}
    found = []
    for fault in faults:
        moving_after: dict[str, float | None] = {}
        stalled: dict[str, tuple[int, ...]] = {}
        for group, group_stalls in by_group.items():
            overlapping = [
                stall
                for stall in group_stalls
                if stall.start < fault.t + window and (stall.end is None or stall.end > fault.t)
            ]
            stalled[group] = tuple(sorted({stall.partition for stall in overlapping}))
            if any(stall.end is None for stall in overlapping):
                moving_after[group] = None
            else:
                ends = [stall.end for stall in overlapping if stall.end is not None]
                moving_after[group] = round(max(ends) - fault.t, 1) if ends else 0.0
        after = under_fault(latencies, [fault], run_start=run_start, window=window)
        found.append(Recovery(fault, moving_after, latency_summary(after), stalled))
    return found


def faults_by_kind(faults: Sequence[FaultMark]) -> dict[str, int]:
    return dict(sorted(Counter(fault.kind for fault in faults).items()))


def _short_target(target: str) -> str:
    """The target up to any parenthesis, cut to what fits above a line on the chart."""
    return target.split(" (", 1)[0][:20]


def render_chart(path: Path, *, samples: Sequence[Sample], faults: Sequence[FaultMark]) -> None:
    """A PNG: events/s (top) and consumer lag per group (bottom) over time, every fault a dashed
    vertical line on both, coloured by kind, its target written at the top."""
    # A bare Figure draws with the Agg canvas: no pyplot state, no display, nothing to close.
    figure = Figure(figsize=(12, 7), dpi=100, layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    for name, series in rates(samples).items():
        top.plot(
            [t for t, _ in series],
            [math.nan if rate is None else rate for _, rate in series],
            label=name,
            color=_SERIES_COLOURS[name],
            # What the gateway sent, on top of what the consumers made of it.
            linewidth=1.5 if name == "published" else 1,
            zorder=3 if name == "published" else 2,
        )
    top.set_ylabel("events/s")
    for name, attribute in (("usage consumers", "usage_lag"), ("budget consumers", "budget_lag")):
        lags = [getattr(sample, attribute) for sample in samples]
        bottom.plot(
            [sample.t for sample in samples],
            [math.nan if lag is None else lag for lag in lags],
            label=name,
            color=_SERIES_COLOURS[name],
            linewidth=1,
        )
    bottom.set_ylabel("consumer lag (records)")
    bottom.set_xlabel("seconds since the load started")
    for fault in faults:
        colour = _COLOURS.get(fault.kind, "grey")
        for axis in (top, bottom):
            axis.axvline(fault.t, color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
        top.annotate(
            _short_target(fault.target),
            (fault.t, 0.99),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            va="top",
            ha="right",
            color=colour,
        )
    # Beside the panels, so that neither the data nor the fault labels are hidden.
    for axis in (top, bottom):
        axis.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    kinds = faults_by_kind(faults)
    if kinds:
        figure.legend(
            handles=[
                Line2D([], [], color=_COLOURS.get(kind, "grey"), linestyle="--") for kind in kinds
            ],
            labels=[f"{kind} ({count})" for kind, count in kinds.items()],
            loc="outside upper center",
            ncols=len(kinds),
            fontsize=8,
            title="faults",
            title_fontsize=8,
        )
    for axis in (top, bottom):
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    figure.savefig(path, format="png")


def _published_counts(ledger: Ledger) -> tuple[int, dict[str, int]]:
    kinds = {kind: n for kind, n in sorted(ledger.sent.items()) if kind != _RETRIED}
    return sum(kinds.values()), kinds


def _latency_text(latency: AlertLatency | None) -> str:
    return latency.text() if latency else "no alerts"


def _verdict(check: CheckReport) -> str:
    failed = [row.name for row in check.rows if not row.ok]
    if check.ok:
        return f"PASSED: all {len(check.rows)} checks held"
    if not check.rows:
        return "FAILED: the checker produced no rows"
    return f"FAILED: {len(failed)} of {len(check.rows)} checks did not hold ({'; '.join(failed)})"


def summary_lines(
    *,
    samples: Sequence[Sample],
    faults: Sequence[FaultMark],
    alerts: Sequence[AlertArrival],
    ledger: Ledger,
    check: CheckReport,
    run_start: float,
) -> list[str]:
    """The short plain-text answer the command prints at the end: the verdict first, the failing
    checks last."""
    latencies = alert_latencies(alerts, ledger)
    overall = latency_summary([latency for _, latency in latencies])
    faulted = latency_summary(under_fault(latencies, faults, run_start=run_start))
    total, kinds = _published_counts(ledger)
    published = [rate for _, rate in rates(samples)["published"] if rate is not None]
    peaks = lag_peaks(samples)
    lines = [
        _verdict(check),
        f"records acknowledged: {total:,} ({', '.join(f'{k} {n:,}' for k, n in kinds.items())})",
        f"valid events: {len(ledger.events):,}; ids only in aborted transactions: "
        f"{len(ledger.aborted_ids):,}; sends retried: {ledger.sent[_RETRIED]:,}",
        "published events/s: "
        + (
            f"mean {sum(published) / len(published):,.0f}, peak {max(published):,.0f}"
            if published
            else "no samples"
        ),
        "faults: "
        + (", ".join(f"{kind} {n}" for kind, n in faults_by_kind(faults).items()) or "none"),
        "lag peaks: "
        + (
            ", ".join(
                f"{group} {lag:,} records at t={t:.0f} s" for group, (lag, t) in peaks.items()
            )
            or "not measured"
        ),
        f"alert latency: {_latency_text(overall)}",
        f"alert latency within {FAULT_WINDOW_S:.0f} s after a fault: {_latency_text(faulted)}",
        "recovery per fault:",
        *(
            f"  {recovery.text()}"
            for recovery in recoveries(samples, faults, latencies, run_start=run_start)
        ),
    ]
    lines += [
        f"  FAIL {row.name}: expected {row.expected}, found {row.found}"
        + (f" ({row.detail})" if row.detail else "")
        for row in check.rows
        if not row.ok
    ]
    return lines


def _recovery_cell(seconds: float | None) -> str:
    if seconds is None:
        return "not before the end"
    return "0" if seconds == 0.0 else f"{seconds:.1f} s"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(
    *,
    title: str,
    plan_lines: Sequence[str],
    samples: Sequence[Sample],
    faults: Sequence[FaultMark],
    alerts: Sequence[AlertArrival],
    ledger: Ledger,
    check: CheckReport,
    chart_name: str,
    duration_s: float,
    run_start: float,
) -> str:
    """report.md: the verdict on the first line, the seed and replay command, the figures, the
    checks, the chart, every fault injected, and the plan."""
    latencies = alert_latencies(alerts, ledger)
    overall = latency_summary([latency for _, latency in latencies])
    faulted = latency_summary(under_fault(latencies, faults, run_start=run_start))
    total, kinds = _published_counts(ledger)
    stored = next(
        (row.found for row in check.rows if row.name.startswith(_STORED_CHECK_PREFIX)), None
    )
    out = [f"# {'PASSED' if check.ok else 'FAILED'}: {title}", "", f"**{_verdict(check)}**", ""]
    # `plan.plan_lines`: the seed and the replay command first, then one line per planned fault,
    # which go last (the faults table above them says what came of each).
    head, planned = plan_lines[:2], plan_lines[2:]
    out += ["## Seed and replay", "", "```", *head, "```", ""]

    out += ["## Figures", "", f"Load: {duration_s:,.0f} s.", ""]
    out += ["| records acknowledged by the cluster | count |", "| --- | ---: |"]
    out += [f"| {_cell(kind)} | {n:,} |" for kind, n in kinds.items()]
    out += [f"| **all kinds** | **{total:,}** |", ""]
    out += [
        f"- valid events acknowledged (each must be stored once): {len(ledger.events):,}",
        f"- events stored: {_cell(stored) if stored is not None else 'not checked'}",
        f"- ids sent only in aborted transactions (never to be stored): "
        f"{len(ledger.aborted_ids):,}",
        f"- sends retried after an error: {ledger.sent[_RETRIED]:,}",
        "",
        "| events/s | average during the load | peak |",
        "| --- | ---: | ---: |",
    ]
    for name, figure in rate_figures(samples, load_seconds=duration_s).items():
        average = "-" if figure.average is None else f"{figure.average:,.0f}"
        peak = (
            "-"
            if figure.peak is None or figure.peak_at is None
            else f"{figure.peak:,.0f} at t={figure.peak_at:.0f} s"
        )
        out.append(f"| {name} | {average} | {peak} |")
    out += ["", "| faults injected | count |", "| --- | ---: |"]
    out += [f"| {_cell(kind)} | {n} |" for kind, n in faults_by_kind(faults).items()] or [
        "| none | 0 |"
    ]
    out += ["", "| consumer group | peak lag (records) | at |", "| --- | ---: | ---: |"]
    peaks = lag_peaks(samples)
    out += [f"| {group} | {lag:,} | t={t:.0f} s |" for group, (lag, t) in peaks.items()] or [
        "| - | not measured | |"
    ]
    out += [
        "",
        "Alert latency, from the triggering event's acknowledgement to the alert on the topic:",
        "",
        f"- all alerts: {_latency_text(overall)}",
        f"- triggered within {FAULT_WINDOW_S:.0f} s after a fault: {_latency_text(faulted)}",
        "",
    ]

    out += [
        "## Checks",
        "",
        "| check | expected | found | ok | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in check.rows:
        ok = "yes" if row.ok else "**NO**"
        out.append(
            f"| {_cell(row.name)} | {_cell(row.expected)} | {_cell(row.found)} | {ok} "
            f"| {_cell(row.detail)} |"
        )
    out += ["", "## Chart", ""]
    out += [f"![events/s and consumer lag over the run, every fault a dashed line]({chart_name})"]
    out += [
        "",
        "## Faults",
        "",
        "Recovery: seconds from the fault until every partition of the group moved again "
        f"(a stall is a group offset standing still for at least {MIN_STALL_S:.0f} s with "
        f"records waiting; stalls under way within {FAULT_WINDOW_S:.0f} s after the fault "
        f"count, whatever began them); alerts: those triggered within {FAULT_WINDOW_S:.0f} s "
        "after it.",
        "",
        "| t (s) | kind | target | detail | usage moving again | budget moving again "
        "| alerts p50 / p99 |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for recovery in recoveries(samples, faults, latencies, run_start=run_start):
        fault, alerts_after = recovery.fault, recovery.alerts
        moving = [
            _recovery_cell(recovery.moving_after[group])
            + _stalled_text(recovery.stalled.get(group, ()))
            for group in ("usage", "budget")
        ]
        alert_cell = (
            "-"
            if alerts_after is None
            else f"{alerts_after.p50:.2f} / {alerts_after.p99:.2f} s ({alerts_after.count})"
        )
        out.append(
            f"| {fault.t:.1f} | {_cell(fault.kind)} | {_cell(fault.target)} "
            f"| {_cell(fault.detail)} | {moving[0]} | {moving[1]} | {alert_cell} |"
        )
    if not faults:
        out.append("| - | none | | | | | |")
    if planned:
        out += ["", "## The plan", "", "<details><summary>every planned fault</summary>", ""]
        out += ["```", *planned, "```", "", "</details>"]
    out.append("")
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
    """Write soak.png and report.md into `directory` (created if needed); return report.md."""
    directory.mkdir(parents=True, exist_ok=True)
    render_chart(directory / CHART_NAME, samples=samples, faults=faults)
    report = directory / REPORT_NAME
    report.write_text(
        render_markdown(
            title=title,
            plan_lines=plan_lines,
            samples=samples,
            faults=faults,
            alerts=alerts,
            ledger=ledger,
            check=check,
            chart_name=CHART_NAME,
            duration_s=duration_s,
            run_start=run_start,
        ),
        encoding="utf-8",
    )
    return report
