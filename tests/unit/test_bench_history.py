"""`bench history`'s pure pieces: its arguments and the extrapolation to 10⁹ and 10¹⁰ events."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from llm_usage.bench.history import (
    CHECKPOINT_SECONDS,
    HISTORY_MONTHS,
    NEW,
    OLD,
    RAM_BYTES,
    BenchHistoryError,
    IngestFigures,
    SchemaFigures,
    extrapolate,
    figures_for_extrapolation,
    fpi_per_insert,
    history_begins,
    parse_sizes,
    window_fraction,
)


def test_a_longer_history_is_more_months_at_the_same_rate() -> None:
    now = datetime(2031, 6, 15, 12, tzinfo=UTC)
    largest = history_begins(20, 20, now=now)
    assert largest == datetime(2029, 7, 1, tzinfo=UTC)  # the last 24 months, this one included
    tenth = history_begins(2, 20, now=now)
    assert now - tenth == (now - largest) / 10  # same rows a day: a tenth of the span
    assert largest < history_begins(10, 20, now=now) < tenth < now


def test_sizes_are_growing_positive_counts() -> None:
    assert parse_sizes("2000000,20000000") == [2_000_000, 20_000_000]
    assert parse_sizes(" 5, 50 ,") == [5, 50]


@pytest.mark.parametrize("text", ["", "20,2", "0,5", "5,5", "two"])
def test_other_sizes_are_one_clear_error(text: str) -> None:
    with pytest.raises(BenchHistoryError, match="--history"):
        parse_sizes(text)


def test_a_tree_much_larger_than_the_inserts_writes_a_page_image_per_insert() -> None:
    assert fpi_per_insert(10_000_000, 10_000) == pytest.approx(1.0, abs=0.001)


def test_a_tree_much_smaller_than_the_inserts_writes_an_image_per_page() -> None:
    # 1,000 leaves, 100,000 inserts: every leaf once, 1 image per 100 inserts.
    assert fpi_per_insert(1_000, 100_000) == pytest.approx(0.01, rel=1e-6)


def test_as_many_inserts_as_leaves_touch_63_percent_of_them() -> None:
    assert fpi_per_insert(50_000, 50_000) == pytest.approx(1 - math.exp(-1), rel=1e-9)


def test_nothing_inserted_writes_nothing() -> None:
    assert fpi_per_insert(1_000, 0) == 0.0
    assert fpi_per_insert(0, 1_000) == 0.0


def test_the_window_is_eight_days_of_twenty_four_months() -> None:
    assert window_fraction(24, 192) == pytest.approx(8 / (24 * 30.44))


def test_extrapolation_scales_with_the_events_and_sizes_the_random_index_against_ram() -> None:
    figures = SchemaFigures(
        bytes_per_row=600,
        random_index_bytes_per_row=80,
        random_index_rows_fraction=1.0,
        leaf_bytes=8192,
        ordered_fpi_per_insert=0.05,
    )
    e = extrapolate(figures, 10**9)
    assert e.stored_bytes == 600 * 10**9
    assert e.random_index_bytes == 80 * 10**9
    assert e.random_index_share_of_ram == pytest.approx(80e9 / RAM_BYTES)
    # 10⁹ events over 24 months: ~16 inserts/s, ~14,000 per checkpoint against ~9.8M leaves.
    inserts = 10**9 / (HISTORY_MONTHS * 30.44 * 86_400) * CHECKPOINT_SECONDS
    assert e.fpi_per_insert == pytest.approx(fpi_per_insert(80e9 / 8192, inserts) + 0.05)
    assert e.fpi_per_insert == pytest.approx(1.05, abs=0.01)
    assert extrapolate(figures, 10**10).stored_bytes == 10 * e.stored_bytes


def test_the_window_holds_only_its_share_of_the_events() -> None:
    figures = SchemaFigures(600, 80, window_fraction(), 8192, 0.0)
    e = extrapolate(figures, 10**10)
    assert e.random_index_bytes == pytest.approx(10**10 * window_fraction() * 80)


def _measured(
    schema: str, *, random_index_bytes: int, wal_fpi: int, random_index_rows: int
) -> IngestFigures:
    return IngestFigures(
        schema=schema,
        history=19_800_000,
        events=200_000,
        seconds=10.0,
        idx_blks_read=0,
        heap_blks_read=0,
        wal_bytes=0,
        wal_fpi=wal_fpi,
        bytes_per_row=600.0,
        index_bytes_per_row=300.0,
        random_index_bytes=random_index_bytes,
        random_index_rows=random_index_rows,
    )


def test_measured_page_images_beyond_the_random_index_s_share_are_carried_over() -> None:
    leaves = 100_000
    random_share = fpi_per_insert(leaves, 200_000) * 200_000
    measured = _measured(
        OLD,
        random_index_bytes=leaves * 8192,
        wal_fpi=int(random_share) + 10_000,
        random_index_rows=20_000_000,
    )
    figures = figures_for_extrapolation(measured, OLD)
    assert figures.random_index_rows_fraction == 1.0
    assert figures.random_index_bytes_per_row == pytest.approx(leaves * 8192 / 20_000_000)
    assert figures.ordered_fpi_per_insert == pytest.approx(10_000 / 200_000, abs=1e-5)


def test_the_new_schema_s_random_index_is_the_window_s() -> None:
    # Per row of the window as it stood (it holds the bench's own new events too).
    measured = _measured(NEW, random_index_bytes=16_000_000, wal_fpi=0, random_index_rows=400_000)
    figures = figures_for_extrapolation(measured, NEW)
    assert figures.random_index_rows_fraction == window_fraction()
    assert figures.random_index_bytes_per_row == 40
    assert figures.ordered_fpi_per_insert == 0.0
