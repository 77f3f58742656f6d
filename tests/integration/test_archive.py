"""Verified archives against the real PostgreSQL: a table shaped like a detached monthly
partition is archived to Parquet, verified (files against the manifest, the manifest against the
table), tampered with (a file, a row) and restored for an audit; and the same through a real
S3-compatible server (versitygw, tests/tools/versitygw.py).

The month is a fixed one in the past (March 2024): archives are only ever made of months long
over, nothing here compares it with now, so the date cannot age.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from llm_usage.archive.export import ARCHIVE_COLUMNS, LATER_COLUMNS, archive_table
from llm_usage.archive.manifest import MANIFEST_NAME, SLICES, Manifest, tenant_slice
from llm_usage.archive.restore import restore_month, restored_table_name, restored_table_names
from llm_usage.archive.retention import archive_and_verify
from llm_usage.archive.targets import ArchiveError, ArchiveTarget, local_target, s3_target
from llm_usage.archive.verify import table_totals, verify_archive
from llm_usage.cli.main import run as cli_run
from llm_usage.core.errors import LocalServiceError, ServiceUnreachableError
from llm_usage.storage.pool import Connection
from tests.tools.versitygw import S3Server, running_versitygw
from tests.unavailable import service_unavailable

MONTH = date(2024, 3, 1)
START = datetime(2024, 3, 1, tzinfo=UTC)
END = datetime(2024, 4, 1, tzinfo=UTC)
_COLUMNS = ", ".join(f"{name} {pg_type}" for name, pg_type in ARCHIVE_COLUMNS.items())


def _events(count: int) -> list[tuple[Any, ...]]:
    """`count` events of March 2024 with the awkward values an archive must keep: the widest
    charge the contract admits, 18 decimals, NULLs and empty strings, commas, quotes, newlines,
    non-ASCII tenants, the month's first and last microsecond."""
    rows = []
    tenants = [f"tenant-{n}" for n in range(40)] + ['tënant,"quoted"\nline', "租户"]
    for n in range(count):
        tenant = tenants[n % len(tenants)]
        occurred = START + timedelta(seconds=n * 37 % (31 * 86400), microseconds=n % 999_999)
        if n == 0:
            occurred = START
        if n == 1:
            occurred = END - timedelta(microseconds=1)
        charge = {
            0: Decimal("999999999999.999999999999999999"),
            1: Decimal("0.000000000000000001"),
            2: Decimal("0"),
        }.get(n, Decimal(n % 1000) / Decimal(10_000) + Decimal("0.0054"))
        rows.append(
            (
                f"req-{n:08d}",
                tenant,
                None if n % 7 == 0 else f"dep-{n % 3}",
                "" if n % 11 == 0 else f"user-{n % 50}",
                None,
                "api",
                'feature "x", y' if n % 13 == 0 else "chat",
                "openai",
                "gpt-5",
                "chat",
                n % 5000,
                n % 3000,
                n % 100,
                n % 17,
                n % 5000 + n % 3000,
                None if n % 5 == 0 else Decimal(n % 997) / Decimal(1_000_000),
                charge,
                None if n % 9 == 0 else n % 100,
                "percent",
                occurred,
                n % 4 == 0,  # estimated from the price row of the day before
                occurred - timedelta(days=1) if n % 4 == 0 else None,
                occurred + timedelta(milliseconds=250),
            )
        )
    return rows


async def _drop_restored(connection: Connection) -> None:
    for name in restored_table_names(MONTH):
        await connection.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
async def month_table(pool: asyncpg.Pool) -> AsyncIterator[str]:
    """A plain table shaped like the detached partition of March 2024, filled with 5,000 events."""
    name = f"archive_test_{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as connection:
        await connection.execute(f"CREATE TABLE {name} ({_COLUMNS})")
        await connection.copy_records_to_table(
            name, records=_events(5_000), columns=list(ARCHIVE_COLUMNS)
        )
    yield name
    async with pool.acquire() as connection:
        await connection.execute(f"DROP TABLE IF EXISTS {name}")
        await _drop_restored(connection)


async def _archive_verify_restore(pool: asyncpg.Pool, table: str, target: ArchiveTarget) -> None:
    async with pool.acquire() as connection:
        manifest = await archive_table(connection, table=table, month=MONTH, target=target)
        in_table = await table_totals(connection, table)
        report = await verify_archive(target, MONTH, connection=connection, table=table)
        assert report.differences == []
        assert report.ok
        assert report.rows == 5_000
        assert [f.slice for f in manifest.files] == list(range(SLICES))
        assert {f.slice: f.totals for f in manifest.files if f.totals.rows} == in_table
        total = await connection.fetchrow(
            f"SELECT count(*), sum(customer_charge_usd) AS charge, sum(total_tokens) AS total "
            f"FROM {table}"
        )
        assert total is not None
        assert manifest.totals.rows == total["count"] == 5_000
        assert manifest.totals.charge_usd == total["charge"]
        assert manifest.totals.tokens["total_tokens"] == total["total"]
        # The manifest on the target says the same, exactly.
        text = target.read_bytes(f"{target.month_dir('2024-03')}/{MANIFEST_NAME}")
        assert Manifest.from_json(text).totals == manifest.totals

        await _drop_restored(connection)
        assert await restore_month(connection, target, MONTH) == 5_000
        restored = restored_table_name(MONTH)
        columns = ", ".join(ARCHIVE_COLUMNS)
        # Every row equal, value for value (numeric equality: 0.0054 = 0.005400000000000000).
        differing = await connection.fetchval(
            f"""SELECT count(*) FROM (
                  (SELECT {columns} FROM {table} EXCEPT ALL SELECT {columns} FROM {restored})
                  UNION ALL
                  (SELECT {columns} FROM {restored} EXCEPT ALL SELECT {columns} FROM {table})
                ) d"""
        )
        assert differing == 0
        # The live table is untouched by a restore.
        assert restored != "llm_usage_events"


async def test_a_month_is_archived_verified_and_restored_equal(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    await _archive_verify_restore(pool, month_table, target)
    names = target.files_in(target.month_dir("2024-03"))
    assert names == sorted(
        [
            MANIFEST_NAME,
            *(f"slice-{n:02d}.parquet" for n in range(SLICES)),
            "corrections.parquet",  # the month's corrections, none here (design §4)
            "effective.parquet",
        ]
    )


async def test_an_empty_month_is_sixteen_empty_files_that_verify_and_restore(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    name = f"archive_test_{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as connection:
        await connection.execute(f"CREATE TABLE {name} ({_COLUMNS})")
        try:
            async with connection.transaction():  # the caller's transaction is used as is
                manifest = await archive_table(connection, table=name, month=MONTH, target=target)
            assert manifest.totals.rows == 0
            assert len(manifest.files) == SLICES
            report = await verify_archive(target, MONTH, connection=connection, table=name)
            assert report.differences == []
            await _drop_restored(connection)
            assert await restore_month(connection, target, MONTH) == 0
        finally:
            await connection.execute(f"DROP TABLE {name}")
            await _drop_restored(connection)


async def test_the_retention_step_archives_once_and_verifies_every_time(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        first = await archive_and_verify(connection, table=month_table, month=MONTH, target=target)
        assert first.ok
        assert first.compared_with_table == month_table
        manifest_path = Path(target.month_dir("2024-03")) / MANIFEST_NAME
        written = manifest_path.read_bytes()
        # Run again (a crash before the DROP): the archive is not rewritten, only verified.
        again = await archive_and_verify(connection, table=month_table, month=MONTH, target=target)
        assert again.ok
        assert manifest_path.read_bytes() == written
        # A row the archive does not hold: not OK, so the caller keeps the table.
        await connection.execute(
            f"INSERT INTO {month_table} SELECT * FROM {month_table} "
            "WHERE gateway_request_id = 'req-00000077'"
        )
        late = await archive_and_verify(connection, table=month_table, month=MONTH, target=target)
    assert not late.ok
    assert len(late.differences) >= 2  # rows and charge of one slice, at least
    assert all(d.startswith("slice ") for d in late.differences)


async def test_every_row_lands_in_its_tenant_s_slice(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        manifest = await archive_table(connection, table=month_table, month=MONTH, target=target)
        # PostgreSQL's slice expression and Python's agree on every tenant.
        rows = await connection.fetch(
            f"SELECT DISTINCT tenant_id, get_byte(sha256(convert_to(tenant_id, 'UTF8')), 0) % 16 "
            f"AS slice FROM {month_table}"
        )
    assert {row["tenant_id"]: row["slice"] for row in rows} == {
        row["tenant_id"]: tenant_slice(row["tenant_id"]) for row in rows
    }
    assert sum(1 for f in manifest.files if f.totals.rows) > 8  # 42 tenants spread out


async def test_a_tampered_file_and_a_changed_row_are_each_reported_exactly(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        manifest = await archive_table(connection, table=month_table, month=MONTH, target=target)
        # One row of the table changes by one millionth of a dollar.
        row = await connection.fetchrow(
            f"UPDATE {month_table} SET customer_charge_usd = customer_charge_usd + 0.000001 "
            "WHERE gateway_request_id = 'req-00000123' RETURNING tenant_id"
        )
        assert row is not None
        changed = tenant_slice(row["tenant_id"])
        report = await verify_archive(target, MONTH, connection=connection, table=month_table)
    archived = manifest.files[changed].totals.charge_usd
    assert report.differences == [
        f"slice {changed:02d}: customer_charge_usd sum: {_plain(archived)} in the archive, "
        f"{_plain(archived + Decimal('0.000001'))} in {month_table}"
    ]

    # One byte of another slice's file flipped.
    victim = next(f for f in manifest.files if f.totals.rows and f.slice != changed)
    path = Path(target.month_dir("2024-03")) / victim.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = await verify_archive(target, MONTH)
    assert not report.ok
    assert any(
        d.startswith(f"{victim.path}: sha256 ") and d.endswith(f"the manifest says {victim.sha256}")
        for d in report.differences
    ), report.differences
    assert all(d.startswith(victim.path) for d in report.differences), report.differences

    # A damaged archive is never restored.
    async with pool.acquire() as connection:
        with pytest.raises(ArchiveError, match="differs from its manifest"):
            await restore_month(connection, target, MONTH)
        assert not await connection.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", restored_table_name(MONTH)
        )


def _plain(value: Decimal) -> str:
    from llm_usage.domain.money import canonical_decimal  # noqa: PLC0415

    return canonical_decimal(value)


async def test_a_missing_file_an_extra_file_and_no_manifest_are_reported(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        await archive_table(connection, table=month_table, month=MONTH, target=target)
    month_dir = Path(target.month_dir("2024-03"))
    (month_dir / "slice-03.parquet").unlink()
    (month_dir / "stray.parquet").write_bytes(b"x")
    report = await verify_archive(target, MONTH)
    assert report.differences == [
        "slice-03.parquet: missing",
        "stray.parquet: in the archive but not in the manifest",
    ]
    (month_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ArchiveError, match="has no manifest: its export did not finish"):
        await verify_archive(target, MONTH)
    with pytest.raises(ArchiveError, match="2024-05 is not archived"):
        await verify_archive(target, date(2024, 5, 1))


async def test_a_table_of_another_month_or_an_archived_month_is_refused(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        with pytest.raises(ArchiveError, match="5000 rows outside 2024-02"):
            await archive_table(
                connection, table=month_table, month=date(2024, 2, 1), target=target
            )
        assert target.months() in ([], ["2024-02"])
        assert not target.exists(f"{target.month_dir('2024-02')}/{MANIFEST_NAME}")
        await archive_table(connection, table=month_table, month=MONTH, target=target)
        with pytest.raises(ArchiveError, match="2024-03 is already archived"):
            await archive_table(connection, table=month_table, month=MONTH, target=target)
        with pytest.raises(ArchiveError, match="there is no table no_such_table"):
            await archive_table(
                connection, table="no_such_table", month=date(2024, 4, 1), target=target
            )


async def test_a_charge_the_archive_cannot_keep_exactly_stops_the_export(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        await connection.execute(
            f"UPDATE {month_table} SET customer_charge_usd = 0.0000000000000000001 "
            "WHERE gateway_request_id = 'req-00000007'"
        )
        with pytest.raises(ArchiveError, match="cannot be archived exactly"):
            await archive_table(connection, table=month_table, month=MONTH, target=target)
    assert not target.exists(f"{target.month_dir('2024-03')}/{MANIFEST_NAME}")
    assert target.files_in(target.month_dir("2024-03")) == []


async def test_the_archive_commands(  # noqa: PLR0917
    pool: asyncpg.Pool,
    month_table: str,
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ARCHIVE_URL", str(tmp_path / "archive"))
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert await _cli(["archive", "list"]) == 0
    assert "no month is archived" in capsys.readouterr().out
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        await archive_table(connection, table=month_table, month=MONTH, target=target)
        await _drop_restored(connection)

    assert await _cli(["archive", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["MONTH", "STATE", "FILES", "ROWS", "CHARGE_USD", "BYTES"]
    assert out[2].split()[:4] == ["2024-03", "archived", "16", "5000"]

    assert await _cli(["archive", "verify", "--period", "2024-03", "--table", month_table]) == 0
    assert capsys.readouterr().out.startswith("2024-03: OK: 16 files, 5000 rows")

    assert await _cli(["archive", "restore", "--period", "2024-03"]) == 0
    assert "restored 5000 rows into restored_usage_events_2024_03" in capsys.readouterr().out
    assert await _cli(["archive", "restore", "--period", "2024-03"]) == 2
    assert "restored_usage_events_2024_03 already exists" in capsys.readouterr().err

    async with pool.acquire() as connection:
        await connection.execute(
            f"DELETE FROM {month_table} WHERE gateway_request_id = 'req-00000042'"
        )
    assert await _cli(["archive", "verify", "--period", "2024-03", "--table", month_table]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines
    assert all(line.startswith("2024-03: slice ") for line in lines)
    assert any("rows: " in line and f"in {month_table}" in line for line in lines)
    assert captured.err.count("\n") == 1

    for argv, message in [
        (["archive", "verify", "--period", "2024-3"], "--period: '2024-3' is not a month"),
        (["archive", "verify", "--period", "2023-01"], "2023-01 is not archived"),
    ]:
        assert await _cli(argv) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
    monkeypatch.setenv("ARCHIVE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("ARCHIVE_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("ARCHIVE_S3_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("ARCHIVE_S3_SECRET_ACCESS_KEY", "s")
    assert await _cli(["archive", "list"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err
    assert err.count("\n") == 1


async def _cli(argv: list[str]) -> int:
    """The command line in a thread: it runs its own event loop."""
    import asyncio  # noqa: PLC0415

    return await asyncio.to_thread(cli_run, argv)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        with running_versitygw(tmp_path_factory.mktemp("versitygw") / "data") as server:
            pafs.S3FileSystem(
                endpoint_override=server.endpoint_url.removeprefix("http://"),
                scheme="http",
                access_key=server.access_key,
                secret_key=server.secret_key,
                region=server.region,
                allow_bucket_creation=True,
            ).create_dir("archive")
            yield server
    except LocalServiceError as error:
        service_unavailable(f"no S3-compatible server (versitygw): {error}")


async def test_a_month_archived_to_an_s3_compatible_store_verifies_and_restores(
    pool: asyncpg.Pool, month_table: str, s3_server: S3Server
) -> None:
    target = s3_target(
        f"s3://archive/events-{uuid.uuid4().hex[:8]}",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    await _archive_verify_restore(pool, month_table, target)
    assert target.months() == ["2024-03"]


async def test_wrong_s3_keys_are_one_clear_error(s3_server: S3Server) -> None:
    target = s3_target(
        "s3://archive/events",
        endpoint_url=s3_server.endpoint_url,
        access_key="nobody",
        secret_key="wrong",  # noqa: S106 - a wrong key, on purpose
    )
    with pytest.raises(ServiceUnreachableError, match="cannot be reached or written"):
        target.months()


async def test_an_archive_of_the_release_before_estimated_charges_verifies_and_restores(
    pool: asyncpg.Pool, month_table: str, tmp_path: Path
) -> None:
    # An archive written before events had charge_estimated and price_effective_from: the same
    # files without those columns, and a manifest saying so.
    target = local_target(tmp_path / "archive")
    async with pool.acquire() as connection:
        await connection.execute(
            f"UPDATE {month_table} SET charge_estimated = false, price_effective_from = NULL"
        )
        manifest = await archive_table(connection, table=month_table, month=MONTH, target=target)
    directory = Path(target.month_dir("2024-03"))
    files = []
    for entry in manifest.files:
        path = directory / entry.path
        earlier = pq.read_table(path).drop_columns(list(LATER_COLUMNS))
        pq.write_table(earlier, path)
        content = path.read_bytes()
        files.append(
            dataclasses.replace(
                entry, bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
            )
        )
    earlier_columns = [c for c in manifest.columns if c not in LATER_COLUMNS]
    rewritten = dataclasses.replace(manifest, files=files, columns=earlier_columns)
    (directory / MANIFEST_NAME).write_text(rewritten.to_json())

    async with pool.acquire() as connection:
        report = await verify_archive(target, MONTH, connection=connection, table=month_table)
        assert report.ok, report.differences
        await _drop_restored(connection)
        assert await restore_month(connection, target, MONTH) == 5_000
        restored = restored_table_name(MONTH)
        flags = await connection.fetch(
            f"SELECT DISTINCT charge_estimated, price_effective_from FROM {restored}"
        )
        assert [tuple(row) for row in flags] == [(False, None)]
        columns = ", ".join(ARCHIVE_COLUMNS)
        differing = await connection.fetchval(
            f"SELECT count(*) FROM (SELECT {columns} FROM {month_table} "
            f"EXCEPT ALL SELECT {columns} FROM {restored}) d"
        )
        assert differing == 0
