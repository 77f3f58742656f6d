from __future__ import annotations

import itertools
from collections import Counter

import pytest

from llm_usage.soak.plan import (
    CONSUMERS,
    PAUSE_SECONDS,
    SECONDS_PER_FAULT,
    WORKERS,
    PlannedFault,
    fault_plan,
    plan_lines,
)


def plan(seed: int, seconds: float = 180.0) -> list[PlannedFault]:
    return fault_plan(seed=seed, seconds=seconds, partitions=6, lowered_scope="t/d", lower_at=60.0)


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert plan(7) == plan(7)
    assert plan(7) != plan(8)


@pytest.mark.parametrize("seconds", [180.0, 1200.0])
def test_every_kind_of_fault_happens_and_more_often_in_a_longer_run(seconds: float) -> None:
    kinds = Counter(fault.kind for fault in plan(3, seconds))
    assert set(kinds) == {*SECONDS_PER_FAULT, "policy_lowered"}
    assert kinds["policy_lowered"] == 1
    for kind, every in SECONDS_PER_FAULT.items():
        assert kinds[kind] == max(1, round(seconds / every))


@pytest.mark.parametrize("seed", range(20))
def test_faults_come_in_time_order_and_never_two_brokers_down_at_once(seed: int) -> None:
    faults = plan(seed, 1200.0)
    assert [fault.at for fault in faults] == sorted(fault.at for fault in faults)
    restarts = [fault for fault in faults if fault.kind == "broker_restart"]
    for first, second in itertools.pairwise(restarts):
        assert second.at >= first.at + first.hold + 5.0


@pytest.mark.parametrize("seed", range(20))
def test_targets_and_holds_fit_their_kind(seed: int) -> None:
    for fault in plan(seed):
        if fault.kind == "sigstop":
            assert fault.target in CONSUMERS
            assert PAUSE_SECONDS[0] <= fault.hold <= PAUSE_SECONDS[1]
        elif fault.kind in ("sigkill", "sigterm"):
            assert fault.target in WORKERS
        elif fault.kind == "broker_restart":
            assert fault.target.startswith("leader of usage partition ")
            assert fault.hold > 4.0  # past the cluster's broker session: the node is fenced


def test_the_printed_plan_names_the_replay_command_and_every_fault() -> None:
    faults = plan(11)
    lines = plan_lines(seed=11, seconds=180.0, faults=faults)
    assert "llm-usage soak --seed 11 --seconds 180" in lines[1]
    assert len(lines) == 2 + len(faults)
    assert any("policy_lowered" in line and "t/d" in line for line in lines)
