"""A storm of one library error becomes a first line, a summary a minute, and an end line."""

from __future__ import annotations

import logging

from llm_usage.core.logs import RepeatSuppressor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(message: str, *args: object, name: str = "aiokafka.conn") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, args, None)


def test_a_storm_is_three_kinds_of_line_not_one_per_error() -> None:
    clock = Clock()
    emitted: list[logging.LogRecord] = []
    suppressor = RepeatSuppressor(
        emit=emitted.append, summary_seconds=60, quiet_seconds=30, clock=clock
    )
    passed = []
    for tick in range(1500):  # every 100 ms for 150 s, as aiokafka does while a broker is down
        clock.now = 1000.0 + tick / 10
        line = record(
            "Unable connect to node with id %s: [Errno 111] %s", 2, ("127.0.0.1", 9000 + tick)
        )
        if suppressor.filter(line):
            passed.append(line.getMessage())
    assert len(passed) == 3  # the first, then a summary at 60 s and at 120 s
    assert passed[0].startswith("Unable connect to node with id 2")
    assert "600 more since the last line; 601 in 60 s, still happening" in passed[1]
    suppressor.flush_ended()
    assert emitted == [], "still happening: no end line yet"
    clock.now += 31
    suppressor.flush_ended()
    [ended] = emitted
    assert "[stopped: 1500 times over 150 s]" in ended.getMessage()
    suppressor.flush_ended()
    assert len(emitted) == 1, "the end is said once"


def test_different_errors_and_our_own_lines_pass_through() -> None:
    suppressor = RepeatSuppressor(emit=print, clock=Clock())
    assert suppressor.filter(record("broker 1 down"))
    assert suppressor.filter(record("something else entirely"))
    assert not suppressor.filter(record("broker 2 down"))  # same shape as the first
    ours = record("Batch did not land", name="llm_usage.runtime.loop")
    assert all(suppressor.filter(ours) for _ in range(5))
    info = logging.LogRecord("aiokafka", logging.INFO, __file__, 1, "joined", None, None)
    assert all(suppressor.filter(info) for _ in range(5))


def test_a_single_error_gets_no_end_line() -> None:
    clock = Clock()
    emitted: list[logging.LogRecord] = []
    suppressor = RepeatSuppressor(emit=emitted.append, quiet_seconds=30, clock=clock)
    assert suppressor.filter(record("once"))
    clock.now += 60
    suppressor.flush_ended()
    assert emitted == []
