"""The soak's fault schedule: drawn from a seed, printed, and replayed exactly from that seed.

Pure: which fault, when, on what, for how long. Carrying it out is `faults.py`'s job.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

WORKERS = ("usage-1", "usage-2", "budget-1", "budget-2", "rollup-1", "rollup-2")
CONSUMERS = WORKERS[:4]
BROKERS = 3

# A consumer paused this long is past its group session (aiokafka's default 10 s) and is
# thrown out of the group; when it resumes it must find out and lose nothing.
PAUSE_SECONDS = (15.0, 22.0)
# A broker down this long is fenced (the cluster's broker session is 4 s) and its partitions move.
BROKER_DOWN_SECONDS = (8.0, 20.0)
# A worker killed by the orchestrator comes back after this long, as a pod would.
RESTART_AFTER_SECONDS = (1.0, 6.0)
# One fault of each kind per this many seconds of load (at least one of each).
SECONDS_PER_FAULT = {
    "sigkill": 40.0,
    "sigterm": 70.0,
    "sigstop": 120.0,
    "broker_restart": 150.0,
    "postgres_restart": 200.0,
}
QUIET_START = 10.0  # the first faults wait until everything runs
QUIET_END = 15.0  # and the last one lets the run settle before the load stops


@dataclass(frozen=True)
class PlannedFault:
    at: float  # seconds since the load started
    kind: str  # sigkill, sigterm, sigstop, broker_restart, postgres_restart, policy_lowered
    target: str  # a worker name, "leader of usage partition N", "postgres" or the lowered scope
    hold: float  # how long the target stays down (or paused) before it comes back

    def line(self) -> str:
        hold = f" for {self.hold:.1f} s" if self.hold else ""
        return f"t={self.at:7.1f} s  {self.kind:<16} {self.target}{hold}"


def fault_plan(
    *, seed: int, seconds: float, partitions: int, lowered_scope: str, lower_at: float
) -> list[PlannedFault]:
    """Every fault of a run of `seconds` of load, in time order.

    Each kind appears at least once and about once per its `SECONDS_PER_FAULT`. Two broker
    restarts never overlap (replication 3 with min.insync.replicas 2 survives one broker down,
    which is the fault under test, not two). The policy is lowered once, at `lower_at`.
    """
    rng = random.Random(f"soak-faults-{seed}")
    start, end = QUIET_START, max(seconds - QUIET_END, QUIET_START + 1.0)
    faults = [PlannedFault(at=lower_at, kind="policy_lowered", target=lowered_scope, hold=0.0)]
    for kind, every in SECONDS_PER_FAULT.items():
        count = max(1, round(seconds / every))
        for slot in range(count):
            # One fault per equal slice of the run, at a random moment in its slice.
            width = (end - start) / count
            at = round(start + slot * width + rng.uniform(0, width), 1)
            faults.append(_fault(rng, kind, at, partitions))
    faults.sort(key=lambda fault: fault.at)
    return _without_overlapping_broker_restarts(faults)


def _fault(rng: random.Random, kind: str, at: float, partitions: int) -> PlannedFault:
    if kind == "broker_restart":
        partition = rng.randrange(partitions)
        return PlannedFault(
            at=at,
            kind=kind,
            target=f"leader of usage partition {partition}",
            hold=round(rng.uniform(*BROKER_DOWN_SECONDS), 1),
        )
    if kind == "postgres_restart":
        return PlannedFault(at=at, kind=kind, target="postgres", hold=0.0)
    if kind == "sigstop":
        return PlannedFault(
            at=at,
            kind=kind,
            target=rng.choice(CONSUMERS),
            hold=round(rng.uniform(*PAUSE_SECONDS), 1),
        )
    return PlannedFault(
        at=at,
        kind=kind,
        target=rng.choice(WORKERS),
        hold=round(rng.uniform(*RESTART_AFTER_SECONDS), 1),
    )


def _without_overlapping_broker_restarts(faults: list[PlannedFault]) -> list[PlannedFault]:
    kept: list[PlannedFault] = []
    broker_back_at = 0.0
    for planned in faults:
        fault = planned
        if fault.kind == "broker_restart":
            if fault.at < broker_back_at + 5.0:
                fault = dataclasses.replace(fault, at=round(broker_back_at + 5.0, 1))
            broker_back_at = fault.at + fault.hold
        kept.append(fault)
    kept.sort(key=lambda fault: fault.at)
    return kept


def plan_lines(*, seed: int, seconds: float, faults: list[PlannedFault]) -> list[str]:
    """What the soak prints before it starts: the seed, the replay command, every fault."""
    return [
        f"seed {seed}, {seconds:.0f} s of load, {len(faults)} faults",
        f"replay: llm-usage soak --seed {seed} --seconds {seconds:g}",
        *(fault.line() for fault in faults),
    ]
