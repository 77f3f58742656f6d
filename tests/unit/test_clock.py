from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llm_usage.core.clock import CLOCK_VARIABLE, SimulatedClock, worker_clock
from llm_usage.core.errors import UserFacingError

START = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)


def test_a_simulated_clock_runs_rate_times_as_fast_from_its_start() -> None:
    clock = SimulatedClock(start=START, real_start=1_000.0, rate=60.0)
    assert clock.at(1_000.0) == START
    assert clock.at(1_030.0) == datetime(2026, 11, 1, tzinfo=UTC)
    assert clock.real_time_of(datetime(2026, 11, 1, tzinfo=UTC)) == 1_030.0


def test_the_clock_travels_to_a_worker_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = SimulatedClock(start=START, real_start=1_000.0, rate=60.0)
    monkeypatch.setenv(CLOCK_VARIABLE, clock.encode())
    now = worker_clock()()
    assert now > START + timedelta(days=1)  # the real clock is far past 1,000 s after 1970
    assert SimulatedClock.decode(clock.encode()) == clock


def test_without_the_variable_a_worker_reads_the_wall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CLOCK_VARIABLE, raising=False)
    assert abs(worker_clock()() - datetime.now(UTC)) < timedelta(seconds=5)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-10-31T23:30:00|1|60",
        "2026-10-31T23:30:00+00:00|x|60",
        "a|1|1",
        "2026-10-31T23:30:00+00:00|1|0",
    ],
)
def test_a_malformed_clock_is_one_clear_error(text: str) -> None:
    with pytest.raises(UserFacingError, match=CLOCK_VARIABLE):
        SimulatedClock.decode(text)
