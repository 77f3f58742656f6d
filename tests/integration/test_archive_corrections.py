"""A month's corrections leave with it (design §4, A11), against a real PostgreSQL: a month past
retention with a void and an amend, applied by the usage consumer, is archived with its
corrections beside its events, verified, dropped with them, and restored beside the events; the
kept month's corrections stay; a corrections file tampered with fails the verify; corrections
that changed after the archive keep the month and every row."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow.parquet as pq
import pytest

from llm_usage.archive.export import archive_table
from llm_usage.archive.manifest import MANIFEST_NAME
from llm_usage.archive.restore import restore_month
from llm_usage.archive.retention import retire_months
from llm_usage.archive.targets import local_target
from llm_usage.archive.verify import read_manifest, verify_archive
from llm_usage.domain.periods import add_months, period_of
from llm_usage.domain.retention import partition_name
from llm_usage.storage import distribution
from llm_usage.storage.migrate import migrate
from tests import clock
from tests.integration.pipeline import unique, usage_event
from tests.integration.test_corrections_usage import correction, land

_CORRECTIONS = "SELECT * FROM usage_corrections WHERE tenant_id = $1 ORDER BY correction_id"
_EFFECTIVE = "SELECT * FROM usage_event_effective WHERE tenant_id = $1 ORDER BY gateway_request_id"


async def _stored_in(
    pool: asyncpg.Pool, month: date, tenant: str, count: int
) -> list[dict[str, Any]]:
    """`count` events of `tenant` on the month's first day, stored by the usage consumer."""
    events = [
        usage_event(
            tenant,
            occurred_at=clock.iso(datetime.combine(month, time(9), UTC) + timedelta(minutes=n)),
        )
        for n in range(count)
    ]
    outcome = await land(pool, *events)
    assert outcome.counts == {"recorded": count}, outcome
    return events


@dataclass(frozen=True)
class _Corrected:
    pool: asyncpg.Pool
    oldest: date
    old: str  # the tenant of the oldest month's events
    kept: str  # the tenant of this month's


@pytest.fixture
async def corrected(empty_database_url: str) -> AsyncIterator[_Corrected]:
    """A database kept one month, with a void and an amend of three events of its oldest month
    (one tenant) and an amend of an event of this month (another tenant), all applied by the
    usage consumer; returns the pool, the oldest month and the two tenants."""
    pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=2)
    assert pool is not None
    async with pool.acquire() as connection:
        await migrate(connection, retention_months=1)
        if os.environ.get("LLM_USAGE_TEST_CITUS") == "1":  # `make test-citus`: distributed
            await distribution.distribute(connection)
    oldest = await pool.fetchval(
        "SELECT min(month) FROM usage_event_months WHERE state = 'attached'"
    )
    old, kept = unique("tenant"), unique("tenant")
    first, second, _ = await _stored_in(pool, oldest, old, 3)
    current = usage_event(kept, occurred_at=clock.iso(clock.earlier_today()))
    assert (await land(pool, current)).counts == {"recorded": 1}
    outcome = await land(
        pool,
        correction(first, "void"),
        correction(second, fields={"input_tokens": 1, "customer_charge_usd": "0.25"}),
        correction(current, fields={"output_tokens": 2}),
    )
    assert outcome.counts == {"recorded": 3}, outcome
    try:
        yield _Corrected(pool, oldest, old, kept)
    finally:
        await pool.close()


async def test_a_retired_month_takes_its_corrections_to_the_archive_and_back(
    corrected: _Corrected, tmp_path: Path
) -> None:
    target = local_target(tmp_path)
    pool, oldest, old, kept = corrected.pool, corrected.oldest, corrected.old, corrected.kept
    corrections = await pool.fetch(_CORRECTIONS, old)
    effective = await pool.fetch(_EFFECTIVE, old)
    assert sorted((r["action"], r["verdict"]) for r in corrections) == [
        ("amend", "applied"),
        ("void", "applied"),
    ]
    assert len(effective) == 2
    kept_before = (await pool.fetch(_CORRECTIONS, kept), await pool.fetch(_EFFECTIVE, kept))
    assert [len(rows) for rows in kept_before] == [1, 1]

    async with pool.acquire() as connection:
        [retired] = await retire_months(
            connection,
            today=add_months(clock.this_month(), 1),
            retention_months=1,
            target=target,
        )

    assert retired.dropped, retired.report.differences
    # The files hold the rows, as the manifest counts them.
    manifest = read_manifest(target, oldest)
    assert [(c.table, c.path, c.rows) for c in manifest.corrections] == [
        ("usage_corrections", "corrections.parquet", 2),
        ("usage_event_effective", "effective.parquet", 2),
    ]
    month_dir = Path(target.month_dir(period_of(oldest)))
    archived = pq.read_table(month_dir / "corrections.parquet").to_pylist()
    assert sorted((r["correction_id"], r["action"]) for r in archived) == sorted(
        (r["correction_id"], r["action"]) for r in corrections
    )
    by_request = {
        r["gateway_request_id"]: r
        for r in pq.read_table(month_dir / "effective.parquet").to_pylist()
    }
    assert by_request.keys() == {r["gateway_request_id"] for r in effective}
    for row in effective:
        assert by_request[row["gateway_request_id"]]["voided"] == row["voided"]
        assert (
            by_request[row["gateway_request_id"]]["customer_charge_usd"]
            == row["customer_charge_usd"]
        )
    # Gone from the live tables with the month; the kept month's rows untouched.
    assert await pool.fetch(_CORRECTIONS, old) == []
    assert await pool.fetch(_EFFECTIVE, old) == []
    assert (
        await pool.fetch(_CORRECTIONS, kept),
        await pool.fetch(_EFFECTIVE, kept),
    ) == kept_before

    # The archive verifies, and comes back beside the events, equal to what was stored.
    assert (await verify_archive(target, oldest)).ok
    async with pool.acquire() as connection:
        await restore_month(connection, target, oldest)
    suffix = f"{oldest:%Y_%m}"
    restored = await pool.fetch(
        f"SELECT * FROM restored_usage_corrections_{suffix} ORDER BY correction_id"
    )
    assert [dict(r) for r in restored] == [dict(r) for r in corrections]
    restored_effective = await pool.fetch(
        f"SELECT * FROM restored_usage_event_effective_{suffix} ORDER BY gateway_request_id"
    )
    assert [dict(r) for r in restored_effective] == [dict(r) for r in effective]

    # One byte of the corrections file flipped: the verify names that file, and only it.
    _flip_a_byte(month_dir / "corrections.parquet")
    report = await verify_archive(target, oldest)
    entry = manifest.corrections[0]
    assert "corrections.parquet: sha256 " in report.differences[0]
    assert report.differences[0].endswith(f"the manifest says {entry.sha256}")
    assert all(d.startswith("corrections.parquet: ") for d in report.differences)


async def test_corrections_that_changed_after_the_archive_keep_the_month_and_every_row(
    corrected: _Corrected, tmp_path: Path
) -> None:
    target = local_target(tmp_path)
    pool, oldest, old, kept = corrected.pool, corrected.oldest, corrected.old, corrected.kept
    async with pool.acquire() as connection:
        # Archived earlier, before one more correction of the month was recorded.
        await archive_table(connection, table=partition_name(oldest), month=oldest, target=target)
        await connection.execute(
            "UPDATE usage_corrections SET event_occurred_at = $2 WHERE tenant_id = $1",
            kept,
            datetime.combine(oldest, time(10), UTC),
        )
        [retired] = await retire_months(
            connection,
            today=add_months(clock.this_month(), 1),
            retention_months=1,
            target=target,
        )

    assert not retired.dropped
    assert retired.report.differences == [
        "usage_corrections: rows: 2 in the archive, 3 in the table"
    ]
    assert len(await pool.fetch(_CORRECTIONS, old)) == 2
    assert len(await pool.fetch(_EFFECTIVE, old)) == 2
    state = await pool.fetchval("SELECT state FROM usage_event_months WHERE month = $1", oldest)
    assert state == "detached"
    assert (Path(target.month_dir(period_of(oldest))) / MANIFEST_NAME).exists()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
