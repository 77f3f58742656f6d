"""The archive manifest's maths: exact totals, a JSON round trip that loses nothing and holds no
float, a stable tenant slice, and differences named exactly."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_usage.archive.export import ARCHIVE_SCHEMA, totals_of
from llm_usage.archive.manifest import (
    SLICES,
    TOKEN_COLUMNS,
    ArchivedFile,
    CorrectionFile,
    Manifest,
    ManifestError,
    Totals,
    slice_file_name,
    sum_totals,
    tenant_slice,
)
from llm_usage.domain.money import EXACT_CONTEXT

# Every charge the contract admits: up to 12 digits before the point and 18 after.
charges = st.decimals(
    min_value=Decimal(0),
    max_value=Decimal("999999999999.999999999999999999"),
    places=18,
    allow_nan=False,
    allow_infinity=False,
)
token_counts = st.integers(min_value=0, max_value=2**63 - 1)
totals = st.builds(
    Totals,
    rows=st.integers(min_value=0, max_value=10**12),
    charge_usd=charges,
    tokens=st.fixed_dictionaries({name: token_counts for name in TOKEN_COLUMNS}),
)


def _manifest(parts: list[Totals]) -> Manifest:
    files = [
        ArchivedFile(
            slice=n,
            path=slice_file_name(n),
            totals=part,
            bytes=1000 + n,
            sha256=f"{n:064x}",
        )
        for n, part in enumerate(parts)
    ]
    return Manifest(
        month=date(2024, 3, 1),
        source_table="llm_usage_events_2024_03",
        files=files,
        columns=["gateway_request_id"],
        created_at="2024-05-01T00:00:00+00:00",
    )


@given(st.lists(totals, min_size=SLICES, max_size=SLICES))
@settings(max_examples=60)
def test_the_month_s_totals_are_the_exact_sum_of_its_files(parts: list[Totals]) -> None:
    manifest = _manifest(parts)
    assert manifest.totals.rows == sum(p.rows for p in parts)
    expected = Decimal(0)
    for part in parts:
        expected = EXACT_CONTEXT.add(expected, part.charge_usd)
    assert manifest.totals.charge_usd == expected
    for name in TOKEN_COLUMNS:
        assert manifest.totals.tokens[name] == sum(p.tokens[name] for p in parts)


@given(st.lists(totals, min_size=SLICES, max_size=SLICES))
@settings(max_examples=60)
def test_the_json_round_trip_is_exact_and_holds_no_float(parts: list[Totals]) -> None:
    manifest = _manifest(parts)
    text = manifest.to_json()
    back = Manifest.from_json(text)
    assert back.files == manifest.files
    assert back.totals == manifest.totals
    assert back.month == manifest.month

    def no_float(value: object) -> None:
        assert not isinstance(value, float)
        if isinstance(value, dict):
            for item in value.values():
                no_float(item)
        if isinstance(value, list):
            for item in value:
                no_float(item)

    no_float(json.loads(text))


def test_a_sum_beyond_the_default_decimal_precision_stays_exact() -> None:
    # 30 significant digits each: Python's default context (28 digits) would round this sum.
    big = Decimal("999999999999.999999999999999999")
    assert sum_totals([Totals(rows=1, charge_usd=big)] * 3).charge_usd == Decimal(
        "2999999999999.999999999999999997"
    )


def test_a_manifest_with_a_float_or_totals_that_do_not_add_up_is_refused() -> None:
    text = _manifest([Totals(rows=1, charge_usd=Decimal("0.5"))] * SLICES).to_json()
    with pytest.raises(ManifestError, match="not exact"):
        Manifest.from_json(text.replace('"rows": 1,', '"rows": 1.0,', 1))
    data = json.loads(text)
    data["totals"]["customer_charge_usd"] = "7.999999999999999999"
    with pytest.raises(ManifestError, match=r"customer_charge_usd sum: 7\.999999999999999999 in"):
        Manifest.from_json(json.dumps(data))
    data = json.loads(text)
    data["files"][0]["path"] = "../elsewhere.parquet"
    with pytest.raises(ManifestError, match="not a plain file name"):
        Manifest.from_json(json.dumps(data))
    with pytest.raises(ManifestError, match="not a manifest"):
        Manifest.from_json("[1,")


def test_the_corrections_files_round_trip_and_an_earlier_manifest_lists_none() -> None:
    manifest = dataclasses.replace(
        _manifest([Totals()] * SLICES),
        corrections=[
            CorrectionFile("usage_corrections", "corrections.parquet", 2, 900, "a" * 64),
            CorrectionFile("usage_event_effective", "effective.parquet", 0, 800, "b" * 64),
        ],
    )
    text = manifest.to_json()
    assert Manifest.from_json(text).corrections == manifest.corrections
    data = json.loads(text)
    assert data["corrections"][0] == {
        "table": "usage_corrections",
        "path": "corrections.parquet",
        "rows": 2,
        "bytes": 900,
        "sha256": "a" * 64,
    }
    del data["corrections"]  # as an earlier release wrote it
    assert Manifest.from_json(json.dumps(data)).corrections == []
    data["corrections"] = [{**manifest.corrections[0].to_json(), "rows": -1}]
    with pytest.raises(ManifestError, match="'rows' is not a whole number"):
        Manifest.from_json(json.dumps(data))
    data["corrections"] = [{**manifest.corrections[0].to_json(), "path": "a/b.parquet"}]
    with pytest.raises(ManifestError, match="not a plain file name"):
        Manifest.from_json(json.dumps(data))


def test_differences_name_the_figure_and_both_values() -> None:
    archived = Totals(rows=10, charge_usd=Decimal("1.50"), tokens=dict.fromkeys(TOKEN_COLUMNS, 7))
    table = Totals(
        rows=9,
        charge_usd=Decimal("1.500001"),
        tokens={**dict.fromkeys(TOKEN_COLUMNS, 7), "reasoning_tokens": 8},
    )
    assert archived.differences(table, mine="the archive", theirs="t") == [
        "rows: 10 in the archive, 9 in t",
        "customer_charge_usd sum: 1.5 in the archive, 1.500001 in t",
        "reasoning_tokens sum: 7 in the archive, 8 in t",
    ]
    assert archived.differences(archived, mine="a", theirs="b") == []
    # Equal in value is equal: 1.50 and 1.5 are the same amount.
    assert Totals(charge_usd=Decimal("1.50")) == Totals(charge_usd=Decimal("1.5"))


def test_the_tenant_slice_is_stable_and_spreads_tenants() -> None:
    # Fixed values: archives made by one release must be checked by the next.
    assert [tenant_slice(t) for t in ["tenant-1", "acme", "租户", ""]] == [10, 2, 0, 3]
    counts = [0] * SLICES
    for n in range(16_000):
        counts[tenant_slice(f"tenant-{n}")] += 1
    assert min(counts) > 850
    assert max(counts) < 1150


@given(
    st.lists(
        st.tuples(charges, st.lists(token_counts, min_size=5, max_size=5)),
        max_size=60,
    )
)
@settings(max_examples=60, deadline=None)
def test_totals_of_parquet_columns_equal_the_exact_python_sums_without_overflow(
    rows: list[tuple[Decimal, list[int]]],
) -> None:
    columns: dict[str, list[object]] = {name: [None] * len(rows) for name in ARCHIVE_SCHEMA.names}
    columns["customer_charge_usd"] = [charge for charge, _ in rows]
    for index, name in enumerate(TOKEN_COLUMNS):
        columns[name] = [tokens[index] for _, tokens in rows]
    table = pa.Table.from_pydict(columns, schema=ARCHIVE_SCHEMA)
    expected = Decimal(0)
    for charge, _ in rows:
        expected = EXACT_CONTEXT.add(expected, charge)
    got = totals_of(table)
    assert got.rows == len(rows)
    assert got.charge_usd == expected
    for index, name in enumerate(TOKEN_COLUMNS):
        assert got.tokens[name] == sum(tokens[index] for _, tokens in rows)
