"""`bench ingest`'s pure pieces: medians and spreads, what /proc says about the child consumer,
when its group has drained the topic, its metrics, and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition

from llm_usage.bench.ingest import (
    MIB,
    ConsumerRun,
    RunFigures,
    Spread,
    assigned_at,
    consumer_line,
    events_by_result,
    offsets_reached,
    rss_at,
    run_table,
    summary_lines,
)
from llm_usage.bench.support import (
    Measurement,
    ProcessMemory,
    busy_cpu_seconds_from_stat,
    cores_from_stat,
    cpu_seconds_from_stat,
    machine_busy_cpu_seconds,
    machine_cores,
    memory_from_status,
    process_cpu_seconds,
    process_memory,
)
from llm_usage.cli.main import build_parser

# /proc/<pid>/stat of a python process, its name holding a space and a parenthesis; utime 1234
# and stime 566 ticks (fields 14 and 15).
STAT = (
    "4242 (py (x) thon) S 4200 4242 4200 34816 4242 4194304 21015 0 0 0 1234 566 0 0 20 0 "
    "3 0 812345 524288000 30000 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 "
    "0 0 0"
)

STATUS = """Name:\tpython
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t  600000 kB
VmSize:\t  512000 kB
VmHWM:\t  101376 kB
VmRSS:\t   86016 kB
RssAnon:\t   70000 kB
Threads:\t3
"""


def test_cpu_seconds_are_utime_plus_stime_counted_after_the_name() -> None:
    assert cpu_seconds_from_stat(STAT, 100) == pytest.approx(18.0)
    assert cpu_seconds_from_stat(STAT, 250) == pytest.approx(7.2)


def test_the_machines_busy_time_sums_work_but_not_idle_iowait_or_steal() -> None:
    stat = (
        "cpu  1000 50 300 9000 400 20 30 700 0 0\n"
        "cpu0 500 25 150 4500 200 10 15 350 0 0\n"
        "intr 12345\n"
    )
    # user + nice + system + irq + softirq = 1,400 ticks
    assert busy_cpu_seconds_from_stat(stat, 100) == pytest.approx(14.0)
    with pytest.raises(ValueError, match="summed cpu line"):
        busy_cpu_seconds_from_stat(stat.split("\n", 1)[1], 100)
    assert cores_from_stat(stat) == 1
    assert cores_from_stat(stat.replace("intr", "cpu1 1 2 3 4 5 6 7 8 0 0\nintr")) == 2


def test_the_cores_counted_are_this_machines() -> None:
    assert machine_cores() == len(
        [line for line in Path("/proc/stat").read_text().splitlines() if line[3:4].isdigit()]
    )


def test_the_machines_busy_time_grows_while_this_process_works() -> None:
    before = machine_busy_cpu_seconds()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert machine_busy_cpu_seconds() - before >= 0.2


def test_cpu_seconds_of_a_process_named_plainly() -> None:
    plain = STAT.replace("(py (x) thon)", "(python)")
    assert cpu_seconds_from_stat(plain, 100) == pytest.approx(18.0)


def test_cpu_seconds_of_this_process_grow_with_work() -> None:
    pid = os.getpid()
    before = process_cpu_seconds(pid)
    total = 0
    while process_cpu_seconds(pid) - before < 0.05:
        total += sum(range(10_000))
    assert total > 0


def test_memory_of_this_process_is_read_from_proc() -> None:
    memory = process_memory(os.getpid())
    assert 0 < memory.rss_bytes <= memory.peak_bytes


def test_memory_is_rss_and_high_water_mark_in_bytes() -> None:
    assert memory_from_status(STATUS) == ProcessMemory(
        rss_bytes=86016 * 1024, peak_bytes=101376 * 1024
    )


def test_memory_needs_both_lines() -> None:
    with pytest.raises(ValueError, match="VmRSS"):
        memory_from_status("Name:\tkthreadd\nState:\tS (sleeping)\n")
    with pytest.raises(ValueError, match="VmHWM"):
        memory_from_status("Name:\tpython\nVmRSS:\t   86016 kB\n")


def test_memory_refuses_a_unit_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="unit"):
        memory_from_status(STATUS.replace("86016 kB", "84 MB"))


def test_spread_is_the_median_and_the_range() -> None:
    assert Spread.of([0.19, 0.11, 0.16]) == Spread(median=0.16, low=0.11, high=0.19)
    assert Spread.of([3.0, 1.0, 2.0, 10.0]) == Spread(median=2.5, low=1.0, high=10.0)
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0)
    assert Spread(0.16, 0.11, 0.19).describe(".2f") == "0.16 (0.11-0.19)"


def test_spread_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        Spread.of([])


def test_rss_profile_picks_the_sample_nearest_each_point_of_the_run() -> None:
    samples = [(0.0, 50), (0.2, 80), (0.45, 81), (0.72, 82), (0.85, 83), (1.0, 84)]
    assert rss_at(samples, (0.0, 0.25, 0.5, 0.75, 1.0)) == [50, 80, 81, 82, 84]
    # Times need not start at 0 nor be evenly spaced.
    assert rss_at([(10.0, 1), (10.1, 2), (19.0, 3), (20.0, 4)], (0.5, 1.0)) == [3, 4]
    with pytest.raises(ValueError, match="no samples"):
        rss_at([], (0.5,))


P0, P1, P2 = (TopicPartition("t", p) for p in range(3))


def test_offsets_reached_only_when_every_partition_with_records_is_committed_to_its_end() -> None:
    ends = {P0: 100, P1: 50, P2: 0}
    assert offsets_reached({P0: 100, P1: 50}, ends)
    assert offsets_reached({P0: 100, P1: 50, P2: -1}, ends)  # the empty one needs no commit
    assert not offsets_reached({P0: 100, P1: 49}, ends)
    assert not offsets_reached({P0: 100}, ends)  # not committed yet
    assert not offsets_reached({P0: 100, P1: -1}, ends)
    assert not offsets_reached({}, ends)
    assert offsets_reached({}, {P0: 0})


EXPOSITION = """\
# HELP llm_usage_consumer_events_total Records handled, by result.
# TYPE llm_usage_consumer_events_total counter
llm_usage_consumer_events_total{consumer="usage",result="recorded"} 181234.0
llm_usage_consumer_events_total{consumer="usage",result="duplicate"} 18766.0
llm_usage_consumer_events_total{consumer="usage",result="conflict"} 0.0
llm_usage_consumer_events_total{consumer="budget",result="recorded"} 5.0
# HELP llm_usage_consumer_events_created Records handled, by result.
# TYPE llm_usage_consumer_events_created gauge
llm_usage_consumer_events_created{consumer="usage",result="recorded"} 1.7e+09
# HELP llm_usage_consumer_retries_total Retries.
# TYPE llm_usage_consumer_retries_total counter
llm_usage_consumer_retries_total{consumer="usage",operation="database"} 2.0
"""


def test_events_by_result_reads_only_this_consumers_event_counter() -> None:
    assert events_by_result(EXPOSITION) == {"recorded": 181234, "duplicate": 18766, "conflict": 0}
    assert events_by_result(EXPOSITION, consumer="budget") == {"recorded": 5}
    assert events_by_result("") == {}


def test_assigned_at_is_the_first_assignment_logged() -> None:
    lines = [
        "not json at all",
        json.dumps({"event": "Consumer started.", "timestamp": "2026-11-25T01:26:46.777570Z"}),
        json.dumps({"event": "Partitions assigned.", "timestamp": "2026-11-25T01:26:46.990700Z"}),
        json.dumps({"event": "Partitions assigned.", "timestamp": "2026-11-25T01:27:00.000000Z"}),
    ]
    expected = datetime(2026, 11, 25, 1, 26, 46, 990700, tzinfo=UTC).timestamp()
    assert assigned_at("\n".join(lines)) == pytest.approx(expected)
    assert assigned_at("\n".join(lines[:2])) is None


def _consumer(
    *, rows: int, seconds: float, cpu: float, peak_mib: int, machine: float | None = None
) -> ConsumerRun:
    return ConsumerRun(
        rows=rows,
        events_read=200_000,
        seconds=seconds,
        cpu_seconds=cpu,
        rss_samples=((0.0, 51 * MIB), (3.0, 84 * MIB), (10.0, 82 * MIB)),
        peak_rss_bytes=peak_mib * MIB,
        results={"recorded": rows, "duplicate": 200_000 - rows, "conflict": 0},
        exit_code=0,
        log_path=Path("consumer.log"),
        clock_late_seconds=0.007,
        harness_cpu_seconds=0.3,
        machine_busy_seconds=3 * cpu if machine is None else machine,
    )


def _run(a_seconds: float, b_rate: float, c_rate: float, cpu: float, peak_mib: int) -> RunFigures:
    rows = 180_000
    return RunFigures(
        consumer=_consumer(rows=rows, seconds=a_seconds, cpu=cpu, peak_mib=peak_mib),
        naive=Measurement("(b)", 4_500, 4_500 / b_rate),
        ceiling=Measurement("(c)", rows, rows / c_rate),
    )


RUNS = [
    _run(12.0, 1_000, 90_000, 8.0, 90),  # a 15,000 rows/s, 40 µs/event
    _run(9.0, 1_250, 80_000, 6.0, 95),  # a 20,000 rows/s, 30 µs/event
    _run(18.0, 500, 100_000, 4.0, 210),  # a 10,000 rows/s, 20 µs/event
]


def test_ratios_and_cpu_per_event_of_a_run() -> None:
    run = RUNS[0]
    assert run.consumer.rate == pytest.approx(15_000)
    assert run.a_over_c == pytest.approx(15_000 / 90_000)
    assert run.a_over_b == pytest.approx(15.0)
    assert run.consumer.cpu_us_per_event == pytest.approx(40.0)
    assert run.consumer.core_share == pytest.approx(8.0 / 12.0)


def test_run_table_has_a_row_per_run_in_order() -> None:
    table = run_table(RUNS)
    assert table[0].startswith("| run | (a) consumer |")
    assert len(table) == 2 + len(RUNS)
    assert table[2] == (
        "| 1 | 15,000 rows/s | 1,000 rows/s | 90,000 rows/s | 0.17 | 15.0 | 40.0 | 90 MiB | - | - |"
    )
    assert table[4].startswith("| 3 | 10,000 rows/s | 500 rows/s | 100,000 rows/s | 0.10 | 20.0 |")


def test_the_estimated_stream_is_shown_beside_the_all_priced_one() -> None:
    # (e) drained the same 180,000 rows in 12.5 s where (a) took 12.0 s.
    with_estimated = dataclasses.replace(
        RUNS[0], estimated=_consumer(rows=180_000, seconds=12.5, cpu=8.0, peak_mib=90)
    )
    assert with_estimated.e_over_a == pytest.approx(12.0 / 12.5)
    assert run_table([with_estimated])[2].endswith("| 14,400 rows/s | 0.960 |")
    summary = "\n".join(summary_lines([with_estimated], cores=2))
    assert "e/a            0.960 (0.960-0.960)   target >= 0.95: met" in summary
    assert "e/a" not in "\n".join(summary_lines(RUNS, cores=2))


def test_the_stream_with_corrections_is_compared_with_the_one_without() -> None:
    # (k) drained the same 180,000 rows (and its 200,000 records) in 13.0 s where (a) took 12.0 s.
    corrected = _consumer(rows=180_000, seconds=13.0, cpu=8.0, peak_mib=90)
    with_corrections = dataclasses.replace(RUNS[0], corrected=corrected)
    assert with_corrections.k_over_a == pytest.approx(12.0 / 13.0)
    summary = "\n".join(summary_lines([with_corrections], cores=2))
    assert (
        "k/a            0.923 (0.923-0.923)   target >= 0.9: met; (k) read 15,385 "
        "(15,385-15,385) records/s, corrections included"
    ) in summary
    slow = dataclasses.replace(corrected, seconds=24.0)
    assert "0.500 (0.500-0.500)   target >= 0.9: MISSED" in "\n".join(
        summary_lines([dataclasses.replace(RUNS[0], corrected=slow)], cores=2)
    )
    assert "k/a" not in "\n".join(summary_lines(RUNS, cores=2))


def test_summary_gives_median_and_spread_against_each_goal() -> None:
    summary = "\n".join(summary_lines(RUNS, cores=2))
    assert "of 3 runs" in summary
    assert "(a)            15,000 (10,000-20,000) rows/s" in summary
    # a/c: 0.10, 0.17, 0.25; a/b: 15, 16, 20 -> median 16 is below 20
    assert "a/c            0.17 (0.10-0.25)   target >= 0.5: MISSED" in summary
    assert "a/b            16.0 (15.0-20.0)   target >= 20: MISSED" in summary
    assert "consumer CPU   30.0 (20.0-40.0) µs/event   target <= 20: MISSED" in summary
    # one run above 200 MiB misses the memory goal, whatever the median
    assert "peak RSS       95 (90-210) MiB   target <= 200: MISSED" in summary


def test_summary_says_met_when_the_medians_meet_the_goals() -> None:
    fast = [_run(3.0, 2_000, 100_000, 3.0, 120), _run(3.6, 2_400, 110_000, 3.6, 130)]
    summary = "\n".join(summary_lines(fast, cores=2))
    assert "of 2 runs" in summary
    assert "MISSED" not in summary
    assert summary.count(": met") == 4


def test_the_a_over_c_bound_spreads_the_machines_cpu_per_row_over_its_cores() -> None:
    # 180,000 rows in 12 s while the machine was busy 18 s over its cores: 100 µs of CPU a row,
    # so 2 cores could store at most 20,000 rows/s, and 4 cores 40,000.
    consumer = _consumer(rows=180_000, seconds=12.0, cpu=8.0, peak_mib=90, machine=18.0)
    run = RunFigures(consumer, Measurement("(b)", 10, 1.0), Measurement("(c)", 180_000, 2.25))
    assert consumer.machine_cores_busy == pytest.approx(1.5)
    assert consumer.machine_us_per_event == pytest.approx(90.0)  # over 200,000 events read
    assert consumer.rate_bound(2) == pytest.approx(20_000)
    assert run.a_over_c_bound(2) == pytest.approx(0.25)  # (c) is 80,000 rows/s
    assert run.a_over_c_bound(4) == pytest.approx(0.5)
    summary = "\n".join(summary_lines([run], cores=2))
    assert "a/c bound      0.25 (0.25-0.25)   with all 2 cores on (a)'s work" in summary
    assert "the whole machine spent 90.0 (90.0-90.0) µs/event during (a)" in summary


def test_consumer_line_tells_rate_cpu_memory_profile_and_exit() -> None:
    line = consumer_line(RUNS[0].consumer)
    assert "180,000 rows from 200,000 events read (20,000 duplicate, 180,000 recorded)" in line
    assert "0 conflict" not in line  # results that did not occur are left out
    assert "15,000 rows/s" in line
    assert "40.0 µs/event (67% of a core)" in line
    assert "51 / 84 / 84 / 82 / 82 MiB, peak 90 MiB" in line
    assert "exit 0 on SIGTERM" in line
    assert "7 ms after the child logged its assignment" in line


def test_runs_default_to_three_and_must_be_positive() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "ingest"]).runs == 3
    assert parser.parse_args(["bench", "ingest", "--runs", "5"]).runs == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "ingest", "--runs", "0"])
