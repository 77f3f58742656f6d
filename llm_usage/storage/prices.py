"""The price table in `prices`, and every row added to it in `price_changes`.

Rows are only ever added. An addition is one transaction: the pairs it touches are locked (a
transaction-level advisory lock per pair, so two admins adding to one pair take turns; an
addition of many pairs, an import, locks the whole table instead of holding thousands of
locks), the database clock is read under the lock, each row is judged by
`refusal_of_new_price` against the pair's rows as they are now, and the rows and their audit
are written, or nothing is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, TypeAlias

import asyncpg

from llm_usage.core.errors import UserFacingError
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.prices import PRICE_CHANGE_LEAD, Price, refusal_of_new_price
from llm_usage.storage.budget_policies import MAX_ACTOR_LENGTH
from llm_usage.storage.pool import Connection

Pair: TypeAlias = tuple[str, str]

# Any constants work: the key space of the per-pair locks, apart from every other lock's, and
# the whole table's key. Every addition holds the table's lock, shared when it locks its pairs
# one by one, exclusive when it has more than MAX_PAIR_LOCKS pairs (each advisory lock takes a
# slot of the server's shared lock table, sized by max_locks_per_transaction).
PRICE_LOCK_CLASS: Final = 0x6C6C6D50  # "llmP"
PRICE_TABLE_LOCK_KEY: Final = 0x6C6C6D5F70726963  # "llm_pric"
MAX_PAIR_LOCKS: Final = 32
MAX_NAME_LENGTH: Final = 200
PRICE_FIELDS: Final = ("input", "cached_input", "output", "reasoning", "request_fee_usd")

_COLUMNS = f"provider, model, effective_from, {', '.join(PRICE_FIELDS)}"
_ORDER = "ORDER BY provider, model, effective_from"
_SELECT_ALL = f"SELECT {_COLUMNS}, created_at FROM prices {_ORDER}"
_SELECT_PAIRS = f"""
    SELECT {_COLUMNS}, created_at FROM prices
    WHERE (provider, model) IN (SELECT * FROM unnest($1::text[], $2::text[]))
    {_ORDER}
"""
_SELECT_MATCHING = f"""
    SELECT {_COLUMNS}, created_at FROM prices
    WHERE ($1::text IS NULL OR provider = $1) AND ($2::text IS NULL OR model = $2)
    {_ORDER}
"""
# In key order, so that two additions touching the same pairs never wait for each other in a
# circle. A hash collision only makes two pairs take turns.
_LOCK_PAIRS = """
    SELECT pg_advisory_xact_lock($1, key)
    FROM (SELECT DISTINCT hashtext(p || chr(31) || m) AS key
          FROM unnest($2::text[], $3::text[]) AS u(p, m)) AS keys
    ORDER BY key
"""
_INSERT = f"""
    INSERT INTO prices ({_COLUMNS}, created_at, created_by)
    SELECT u.*, $9, $10
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::numeric[], $5::numeric[],
                $6::numeric[], $7::numeric[], $8::numeric[]) AS u
"""
_AUDIT = """
    INSERT INTO price_changes (changed_at, actor, provider, model, old_price, new_price)
    SELECT $1, $2, u.provider, u.model, u.old_price::jsonb, u.new_price::jsonb
    FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS u(provider, model, old_price, new_price, n)
    ORDER BY u.n
"""
_SELECT_HISTORY = """
    SELECT id, changed_at, actor, provider, model, old_price, new_price
    FROM price_changes
    WHERE ($1::text IS NULL OR provider = $1) AND ($2::text IS NULL OR model = $2)
    ORDER BY id DESC
"""


class PriceRefusedError(UserFacingError):
    """A row may not be added; the message says which and why, in one line. Nothing of the
    addition it was part of was added."""


@dataclass(frozen=True, slots=True)
class PriceAddition:
    """What `add_prices` did: the rows added and those already in the table as given, each
    as stored (with its `created_at`)."""

    added: list[Price]
    unchanged: list[Price]


@dataclass(frozen=True, slots=True)
class PriceChange:
    """One row of the audit: when, who, the pair's latest row before (None: the pair's first)
    and the row added, as stored JSON."""

    id: int
    changed_at: datetime
    actor: str
    provider: str
    model: str
    old_price: Mapping[str, Any] | None
    new_price: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "changed_at": _utc(self.changed_at),
            "actor": self.actor,
            "provider": self.provider,
            "model": self.model,
            "old_price": self.old_price,
            "new_price": self.new_price,
        }


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def price_json(price: Price) -> dict[str, str]:
    """A row as the audit, `prices list --json` and the API write it: exact decimal strings."""
    amounts = {name: canonical_decimal(getattr(price, name)) for name in PRICE_FIELDS}
    return {
        "provider": price.provider,
        "model": price.model,
        "effective_from": _utc(price.effective_from),
        **amounts,
    }


def _price_from_row(row: asyncpg.Record) -> Price:
    return Price(
        row["provider"],
        row["model"],
        row["effective_from"],
        input=row["input"],
        cached_input=row["cached_input"],
        output=row["output"],
        reasoning=row["reasoning"],
        request_fee_usd=row["request_fee_usd"],
        created_at=row["created_at"],
    )


def _by_pair(rows: Sequence[asyncpg.Record]) -> dict[Pair, list[Price]]:
    table: dict[Pair, list[Price]] = {}
    for row in rows:
        price = _price_from_row(row)
        table.setdefault(price.pair, []).append(price)
    return table


async def load_prices(
    connection: Connection, pairs: Collection[Pair] | None = None
) -> dict[Pair, list[Price]]:
    """Each pair's rows in ascending `effective_from`, in one round trip: of `pairs` (a pair
    without rows is absent), or of every pair when None."""
    if pairs is None:
        return _by_pair(await connection.fetch(_SELECT_ALL))
    providers, models = _columns(pairs)
    return _by_pair(await connection.fetch(_SELECT_PAIRS, providers, models))


async def find_prices(
    connection: Connection, *, provider: str | None = None, model: str | None = None
) -> dict[Pair, list[Price]]:
    """As `load_prices`, for the pairs of `provider` and/or `model` (None: any)."""
    return _by_pair(await connection.fetch(_SELECT_MATCHING, provider, model))


def _columns(pairs: Collection[Pair]) -> tuple[list[str], list[str]]:
    return [provider for provider, _ in pairs], [model for _, model in pairs]


def _check_name(field: str, value: str) -> None:
    if not 1 <= len(value) <= MAX_NAME_LENGTH or "\x00" in value:
        raise PriceRefusedError(
            f"{field} must be 1 to {MAX_NAME_LENGTH} characters without NUL, not {value!r}"
        )


def _check_actor(actor: str) -> None:
    if not 1 <= len(actor) <= MAX_ACTOR_LENGTH or "\x00" in actor:
        raise PriceRefusedError(
            f"actor must be 1 to {MAX_ACTOR_LENGTH} characters without NUL, not {actor!r}"
        )


@asynccontextmanager
async def _connection(pool_or_connection: asyncpg.Pool | Connection) -> AsyncIterator[Connection]:
    if isinstance(pool_or_connection, asyncpg.Pool):
        async with pool_or_connection.acquire() as connection:
            yield connection
    else:
        yield pool_or_connection


async def add_prices(
    pool_or_connection: asyncpg.Pool | Connection,
    prices: Sequence[Price],
    *,
    actor: str,
    earliest: bool = False,
    dry_run: bool = False,
) -> PriceAddition:
    """Add `prices`, in order, all or none, each audited with `actor`; PriceRefusedError (and
    nothing added) when one may not be added at the database's clock.

    A row equal to one already stored (same pair, `effective_from` and prices) is left as it is
    (`unchanged`), so an import can run twice; a different row at the same instant is refused.
    With `earliest`, each row's `effective_from` is ignored and it takes effect at the earliest
    moment allowed: now for a pair without rows, `PRICE_CHANGE_LEAD` from now otherwise. With
    `dry_run`, everything is judged and then rolled back. Needs READ COMMITTED (PostgreSQL's
    default), where the statements after the lock see what the pair's last adder committed.
    """
    _check_actor(actor)
    for price in prices:
        _check_name("provider", price.provider)
        _check_name("model", price.model)
    async with _connection(pool_or_connection) as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            judged = await _judge(connection, prices, earliest=earliest)
            addition = PriceAddition(added=judged.added, unchanged=judged.unchanged)
            if judged.added and not dry_run:
                await _write(connection, judged, actor=actor)
        except BaseException:
            await transaction.rollback()
            raise
        if dry_run:
            await transaction.rollback()
        else:
            await transaction.commit()
    return addition


def _same_prices(stored: Price, given: Price) -> bool:
    """The same row but for when it was added (a stored row knows, a given one does not)."""
    return dataclasses.replace(stored, created_at=given.created_at) == given


@dataclass(frozen=True, slots=True)
class _Judged:
    now: datetime  # the database's clock, read under the pairs' locks
    added: list[Price]
    predecessors: list[Price | None]  # each added row's pair's latest row before it
    unchanged: list[Price]


async def _judge(connection: Connection, prices: Sequence[Price], *, earliest: bool) -> _Judged:
    """Under the pairs' locks, what to add and what is there already."""
    pairs = {price.pair for price in prices}
    if len(pairs) > MAX_PAIR_LOCKS:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", PRICE_TABLE_LOCK_KEY)
    else:
        await connection.execute("SELECT pg_advisory_xact_lock_shared($1)", PRICE_TABLE_LOCK_KEY)
        await connection.execute(_LOCK_PAIRS, PRICE_LOCK_CLASS, *_columns(pairs))
    now: datetime = await connection.fetchval("SELECT clock_timestamp()")
    table = await load_prices(connection, pairs)
    added: list[Price] = []
    unchanged: list[Price] = []
    predecessors: list[Price | None] = []
    for given in prices:
        rows = table.setdefault(given.pair, [])
        price = given
        if earliest:
            start = now + PRICE_CHANGE_LEAD if rows else now
            price = dataclasses.replace(given, effective_from=start)
        at = price.effective_from
        same_instant = next((row for row in rows if row.effective_from == at), None)
        if same_instant is not None and _same_prices(same_instant, price):
            unchanged.append(same_instant)
            continue
        if same_instant is not None:
            raise PriceRefusedError(
                f"{price.provider}/{price.model} already has a different row from "
                f"{_utc(price.effective_from)}: rows never change; add one with a later "
                "effective_from"
            )
        reason = refusal_of_new_price(price, rows, now=now)
        if reason is not None:
            raise PriceRefusedError(reason)
        price = dataclasses.replace(price, created_at=now)
        predecessors.append(rows[-1] if rows else None)
        rows.append(price)
        added.append(price)
    return _Judged(now=now, added=added, predecessors=predecessors, unchanged=unchanged)


async def _write(connection: Connection, judged: _Judged, *, actor: str) -> None:
    added = judged.added
    amounts: list[list[Decimal]] = [[getattr(p, name) for p in added] for name in PRICE_FIELDS]
    await connection.execute(
        _INSERT,
        [p.provider for p in added],
        [p.model for p in added],
        [p.effective_from for p in added],
        *amounts,
        judged.now,
        actor,
    )
    await connection.execute(
        _AUDIT,
        judged.now,
        actor,
        [p.provider for p in added],
        [p.model for p in added],
        [None if old is None else json.dumps(price_json(old)) for old in judged.predecessors],
        [json.dumps(price_json(p)) for p in added],
    )


async def price_history(
    connection: Connection, provider: str | None = None, model: str | None = None
) -> list[PriceChange]:
    """The audit of rows added, of `provider` and/or `model` (None: any), newest first."""
    return [
        PriceChange(
            id=row["id"],
            changed_at=row["changed_at"],
            actor=row["actor"],
            provider=row["provider"],
            model=row["model"],
            old_price=None if row["old_price"] is None else json.loads(row["old_price"]),
            new_price=json.loads(row["new_price"]),
        )
        for row in await connection.fetch(_SELECT_HISTORY, provider, model)
    ]
