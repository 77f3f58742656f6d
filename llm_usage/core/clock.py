"""The workers' idea of "now", which a soak run may move faster than the wall clock.

Only the soak (and tests) set `LLM_USAGE_SIMULATED_CLOCK`; in production it is unset and `now()`
is the wall clock. The simulated clock starts at a chosen instant when the real clock reads a
chosen Unix time and runs `rate` times as fast, so that a run of a few minutes crosses a month
end and the rollup's close grace. It moves what a worker takes as the current period (the rollup
schedule's months, the policy watcher's current day and month), never deadlines or timeouts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from llm_usage.core.errors import UserFacingError

CLOCK_VARIABLE = "LLM_USAGE_SIMULATED_CLOCK"


@dataclass(frozen=True)
class SimulatedClock:
    """`start` when the real clock read `real_start` (Unix seconds), moving `rate` times as fast."""

    start: datetime
    real_start: float
    rate: float

    def at(self, real_time: float) -> datetime:
        return self.start + timedelta(seconds=(real_time - self.real_start) * self.rate)

    def now(self) -> datetime:
        return self.at(time.time())

    def real_time_of(self, moment: datetime) -> float:
        """The Unix time at which this clock reads `moment`."""
        return self.real_start + (moment - self.start).total_seconds() / self.rate

    def encode(self) -> str:
        return f"{self.start.isoformat()}|{self.real_start!r}|{self.rate!r}"

    @classmethod
    def decode(cls, text: str) -> SimulatedClock:
        try:
            start_text, real_start, rate = text.split("|")
            start = datetime.fromisoformat(start_text)
            clock = cls(start=start, real_start=float(real_start), rate=float(rate))
        except ValueError:
            clock = None
        if clock is None or clock.start.tzinfo is None or clock.rate <= 0:
            raise UserFacingError(
                f"{CLOCK_VARIABLE}={text!r} is not 'START|REAL_START|RATE' (an aware ISO time, "
                "Unix seconds, a rate above 0); it is for soak runs only: unset it"
            )
        return clock


def worker_clock() -> Callable[[], datetime]:
    """What a worker takes as now: the simulated clock when a soak set one, else the wall clock."""
    text = os.environ.get(CLOCK_VARIABLE)
    if not text:
        return lambda: datetime.now(UTC)
    return SimulatedClock.decode(text).now
