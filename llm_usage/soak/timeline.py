"""What the soak records while it runs, on one time axis (seconds since the load started)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """Taken about once a second. Offsets are summed over the usage topic's partitions; a value
    is None when the cluster could not be asked at that moment (a broker was down)."""

    t: float
    published: int  # records the load generator had acknowledged so far (all kinds)
    end_offsets: int | None  # the usage topic's end offsets
    usage_committed: int | None  # the usage consumers' group offsets
    budget_committed: int | None  # the budget consumers' group offsets
    # The same per partition (index = partition), for the recovery times; None: not asked.
    partition_ends: tuple[int, ...] | None = None
    usage_partitions: tuple[int, ...] | None = None
    budget_partitions: tuple[int, ...] | None = None

    def partitions_of(self, group: str) -> tuple[int, ...] | None:
        """`group`'s ("usage", "budget") committed offsets per partition."""
        return self.usage_partitions if group == "usage" else self.budget_partitions

    @property
    def usage_lag(self) -> int | None:
        if self.end_offsets is None or self.usage_committed is None:
            return None
        return max(self.end_offsets - self.usage_committed, 0)

    @property
    def budget_lag(self) -> int | None:
        if self.end_offsets is None or self.budget_committed is None:
            return None
        return max(self.end_offsets - self.budget_committed, 0)


@dataclass(frozen=True)
class FaultMark:
    """A fault as it was injected: when, which kind, on what, and what came of it."""

    t: float
    kind: str  # sigkill, sigterm, sigstop, broker_restart, postgres_restart, policy_lowered
    target: str  # e.g. "consume-usage-1", "broker-2 (leader of 3 partitions)", "postgres"
    detail: str = ""


@dataclass(frozen=True)
class AlertArrival:
    """An alert read from the alerts topic during the run, and when it arrived."""

    alert_id: str
    triggered_by: str | None
    arrived_at: float  # Unix time


@dataclass(frozen=True)
class CheckRow:
    """One line of the checker's table: what was expected, what was found, whether they agree."""

    name: str
    expected: str
    found: str
    ok: bool
    detail: str = ""  # on a failure: the first few offending ids or keys


@dataclass(frozen=True)
class CheckReport:
    rows: tuple[CheckRow, ...]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok for row in self.rows)
