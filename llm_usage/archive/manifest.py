"""The manifest of one archived month, and the exact maths behind it (pure: no I/O).

A month is split into `SLICES` files by a stable hash of `tenant_id`: the first byte of the
SHA-256 of its UTF-8 bytes, modulo 16. The same expression runs in PostgreSQL
(`get_byte(sha256(convert_to(tenant_id, 'UTF8')), 0) % 16`), so the table's own aggregates can be
compared slice by slice. Why 16 slices: a month has a fixed number of files whatever the number
of tenants (a file per tenant would make thousands of tiny files), each about a sixteenth of a
month (~100 MB at 10 million events), and an audit of one tenant reads one file, not the month.

Every number is exact: counts and token sums are integers, the charge sum is a `Decimal` written
as text. The JSON holds no float anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any, Final

from llm_usage.domain.money import EXACT_CONTEXT, canonical_decimal
from llm_usage.domain.periods import parse_period, period_of

SLICES: Final = 16
MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 1
TOKEN_COLUMNS: Final = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
)
# The slice of a row in SQL, the same as `tenant_slice` below.
SLICE_SQL: Final = f"get_byte(sha256(convert_to(tenant_id, 'UTF8')), 0) % {SLICES}"


class ManifestError(ValueError):
    """A manifest that cannot be read: not JSON, a missing field, a float, a wrong type."""


def tenant_slice(tenant_id: str) -> int:
    """The slice (0..15) a tenant's rows are archived in."""
    return hashlib.sha256(tenant_id.encode("utf-8")).digest()[0] % SLICES


def slice_file_name(slice_number: int) -> str:
    return f"slice-{slice_number:02d}.parquet"


@dataclass(frozen=True)
class Totals:
    """Exact sums over some rows: how many, their charge, their five token counts."""

    rows: int = 0
    charge_usd: Decimal = Decimal(0)
    tokens: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COLUMNS, 0))

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            rows=self.rows + other.rows,
            charge_usd=EXACT_CONTEXT.add(self.charge_usd, other.charge_usd),
            tokens={name: self.tokens[name] + other.tokens[name] for name in TOKEN_COLUMNS},
        )

    def differences(self, other: Totals, *, mine: str, theirs: str) -> list[str]:
        """One phrase per differing figure, with both values (`mine` and `theirs` say whose)."""
        found = []
        if self.rows != other.rows:
            found.append(f"rows: {self.rows} in {mine}, {other.rows} in {theirs}")
        if self.charge_usd != other.charge_usd:
            found.append(
                f"customer_charge_usd sum: {canonical_decimal(self.charge_usd)} in {mine}, "
                f"{canonical_decimal(other.charge_usd)} in {theirs}"
            )
        found += [
            f"{name} sum: {self.tokens[name]} in {mine}, {other.tokens[name]} in {theirs}"
            for name in TOKEN_COLUMNS
            if self.tokens[name] != other.tokens[name]
        ]
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "customer_charge_usd": canonical_decimal(self.charge_usd),
            "tokens": {name: self.tokens[name] for name in TOKEN_COLUMNS},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Totals:
        tokens = _mapping(data, "tokens")
        return cls(
            rows=_count(data, "rows"),
            charge_usd=_decimal(data, "customer_charge_usd"),
            tokens={name: _count(tokens, name) for name in TOKEN_COLUMNS},
        )


def sum_totals(parts: Iterable[Totals]) -> Totals:
    total = Totals()
    for part in parts:
        total = total + part
    return total


@dataclass(frozen=True)
class ArchivedFile:
    """One Parquet file of a month: its slice, path within the month, totals, bytes, checksum."""

    slice: int
    path: str
    totals: Totals
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "slice": self.slice,
            "path": self.path,
            **self.totals.to_json(),
            "bytes": self.bytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArchivedFile:
        path, sha = _path_and_sha256(data)
        return cls(
            slice=_count(data, "slice"),
            path=path,
            totals=Totals.from_json(data),
            bytes=_count(data, "bytes"),
            sha256=sha,
        )


@dataclass(frozen=True)
class CorrectionFile:
    """The month's rows of a corrections table (`usage_corrections`, `usage_event_effective`),
    archived beside its events in one Parquet file: its table, path, rows, bytes, checksum."""

    table: str
    path: str
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "path": self.path,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CorrectionFile:
        path, sha = _path_and_sha256(data)
        table = data.get("table")
        if not isinstance(table, str) or not table:
            raise ManifestError(f"a corrections file's table {table!r} is not a name")
        return cls(
            table=table,
            path=path,
            rows=_count(data, "rows"),
            bytes=_count(data, "bytes"),
            sha256=sha,
        )


@dataclass(frozen=True)
class Manifest:
    """What one archived month holds: every file, and the month's totals (their exact sum)."""

    month: date
    source_table: str
    files: Sequence[ArchivedFile]
    columns: Sequence[str]
    created_at: str  # ISO 8601, UTC
    # The month's corrections (an archive of an earlier release has none listed).
    corrections: Sequence[CorrectionFile] = ()

    @property
    def totals(self) -> Totals:
        return sum_totals(file.totals for file in self.files)

    @property
    def period(self) -> str:
        return period_of(self.month)

    def to_json(self) -> str:
        document = {
            "format": FORMAT_VERSION,
            "month": self.period,
            "source_table": self.source_table,
            "created_at": self.created_at,
            "columns": list(self.columns),
            "slicing": {"slices": SLICES, "by": SLICE_SQL},
            "money": "decimal128(38,18): every value the contract admits (12 + 18 digits), exact",
            "files": [file.to_json() for file in self.files],
            "totals": self.totals.to_json(),
            "corrections": [entry.to_json() for entry in self.corrections],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            # A float anywhere is refused: money and counts must come back exactly.
            data = json.loads(text, parse_float=_refuse_float, parse_constant=_refuse_float)
        except (ValueError, ManifestError) as error:
            raise ManifestError(f"not a manifest: {error}") from None
        if not isinstance(data, dict):
            raise ManifestError("not a manifest: the JSON is not an object")
        if data.get("format") != FORMAT_VERSION:
            raise ManifestError(f"format {data.get('format')!r} is not {FORMAT_VERSION}")
        month = data.get("month")
        if not isinstance(month, str):
            raise ManifestError("no month")
        try:
            first_day = parse_period(month)
        except ValueError as error:
            raise ManifestError(str(error)) from None
        files_data = data.get("files")
        if not isinstance(files_data, list):
            raise ManifestError("no list of files")
        files = [ArchivedFile.from_json(_object(item)) for item in files_data]
        columns = data.get("columns")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise ManifestError("no list of columns")
        corrections_data = data.get("corrections", [])
        if not isinstance(corrections_data, list):
            raise ManifestError("'corrections' is not a list")
        manifest = cls(
            month=first_day,
            source_table=str(data.get("source_table", "")),
            files=files,
            columns=columns,
            created_at=str(data.get("created_at", "")),
            corrections=[CorrectionFile.from_json(_object(item)) for item in corrections_data],
        )
        stated = Totals.from_json(_mapping(data, "totals"))
        if stated != manifest.totals:
            raise ManifestError(
                "its totals are not the sum of its files: "
                + "; ".join(stated.differences(manifest.totals, mine="totals", theirs="files"))
            )
        return manifest


def _path_and_sha256(data: Mapping[str, Any]) -> tuple[str, str]:
    sha = data.get("sha256")
    path = data.get("path")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ManifestError("a file's sha256 is not 64 hex digits")
    if not isinstance(path, str) or not path or "/" in path or path.startswith("."):
        raise ManifestError(f"a file's path {path!r} is not a plain file name")
    return path, sha


def _refuse_float(text: str) -> Any:
    raise ManifestError(f"{text} is not exact (a float); a manifest holds none")


def _object(value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError("a file entry is not an object")
    return value


def _mapping(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise ManifestError(f"{name!r} is not an object")
    return value


def _count(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"{name!r} is not a whole number >= 0 (got {value!r})")
    return value


def _decimal(data: Mapping[str, Any], name: str) -> Decimal:
    value = data.get(name)
    if not isinstance(value, str):
        raise ManifestError(f"{name!r} is not a decimal written as text (got {value!r})")
    try:
        number = Decimal(value)
    except ArithmeticError:
        raise ManifestError(f"{name!r} is not a decimal (got {value!r})") from None
    if not number.is_finite() or number < 0:
        raise ManifestError(f"{name!r} is not a finite amount >= 0 (got {value!r})")
    return number
