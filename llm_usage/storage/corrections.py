"""Corrections as the usage consumer stores them (migration 0016): the history
(`usage_corrections`), each corrected event's effective values (`usage_event_effective`), the
corrections waiting for their event (`correction_waits`), and the advisory locks that serialise
the appliers of one event. Every read and write is one round trip for a whole batch."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import asyncpg

from llm_usage.core.errors import TransientError
from llm_usage.domain.corrections import Action, Correction, Effective, Verdict
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.event_ids import TierOneKey
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.pool import Connection
from llm_usage.storage.usage_events import USAGE_EVENT_COLUMNS

CorrectionKey = tuple[str, str]  # (tenant_id, correction_id)
EventKey = tuple[str, str]  # (tenant_id, gateway_request_id)

# Advisory lock class of the correction buckets ("llmC"): one of 256 buckets of (tenant, id),
# so a transaction holds at most 256 of them however many corrections its batch has.
CORRECTION_LOCK_CLASS = 0x6C6C6D43

_LOCK_BUCKETS = """
    SELECT pg_advisory_xact_lock($1, b)
    FROM (SELECT DISTINCT hashtext(t || '/' || g) & 255 AS b
          FROM unnest($2::text[], $3::text[]) AS u(t, g)) AS buckets
    ORDER BY b
"""


async def lock_correction_buckets(connection: Connection, events: Iterable[EventKey]) -> None:
    """Hold, for the rest of the transaction, the bucket lock of every (tenant_id,
    gateway_request_id) of `events`, in ascending bucket order: the first locks of any work that
    applies corrections (design §7)."""
    keys = list(dict.fromkeys(events))
    if keys:
        await connection.execute(
            _LOCK_BUCKETS, CORRECTION_LOCK_CLASS, [k[0] for k in keys], [k[1] for k in keys]
        )


# The side tasks' form: each bucket only if no other transaction holds it, never waiting; the
# events of the buckets taken. A side task waiting for a bucket held by a batch holds the lower
# ones meanwhile, and the next batches queue behind it (in bench budget such convoys cost a
# batch up to 1.8 s): the events of a bucket held elsewhere are simply left to the next round.
_TRY_LOCK_BUCKETS = """
    WITH e AS MATERIALIZED (
        SELECT t, g, hashtext(t || '/' || g) & 255 AS b
        FROM unnest($2::text[], $3::text[]) AS u(t, g)
    ), held AS MATERIALIZED (
        SELECT b FROM (SELECT DISTINCT b FROM e) AS buckets WHERE pg_try_advisory_xact_lock($1, b)
    )
    SELECT e.t, e.g FROM e JOIN held ON held.b = e.b
"""


async def try_lock_correction_buckets(
    connection: Connection, events: Iterable[EventKey]
) -> set[EventKey]:
    """Take, for the rest of the transaction, the bucket locks of `events` that no other
    transaction holds, without waiting; the events whose buckets are now held."""
    keys = list(dict.fromkeys(events))
    if not keys:
        return set()
    rows = await connection.fetch(
        _TRY_LOCK_BUCKETS, CORRECTION_LOCK_CLASS, [k[0] for k in keys], [k[1] for k in keys]
    )
    return {(row["t"], row["g"]) for row in rows}


# --- the history -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JudgedCorrection:
    """A correction the usage consumer judged, as `usage_corrections` holds it."""

    verdict: Verdict
    correction: Correction
    won: bool  # it was the winner of its event when applied
    late: bool  # the event's month was closed then
    billed_in: str | None  # the month whose closed lines trued it up
    received_at: datetime


_MONEY_FIELDS = frozenset({"customer_charge_usd"})


def fields_from_json(stored: Mapping[str, Any]) -> dict[str, object]:
    """The typed fields of a correction from their jsonb form (money as exact strings)."""
    return {
        name: Decimal(value) if name in _MONEY_FIELDS and value is not None else value
        for name, value in stored.items()
    }


def correction_of(row: asyncpg.Record) -> Correction:
    """A `usage_corrections` row (its fields read as text) as the model's Correction."""
    return Correction(
        tenant_id=row["tenant_id"],
        correction_id=row["correction_id"],
        gateway_request_id=row["gateway_request_id"],
        action=Action(row["action"]),
        fields=fields_from_json(json.loads(row["fields"])),
        reason=row["reason"],
        actor=row["actor"],
        occurred_at=row["occurred_at"],
        event_occurred_at=row["event_occurred_at"],
    )


_JUDGED = """
    SELECT c.tenant_id, c.correction_id, c.gateway_request_id, c.action, c.fields::text AS fields,
           c.reason, c.actor, c.occurred_at, c.event_occurred_at, c.verdict, c.won, c.late,
           c.billed_in, c.received_at
    FROM unnest($1::text[], $2::text[]) AS k(tenant_id, correction_id)
    JOIN usage_corrections AS c
      ON c.tenant_id = k.tenant_id AND c.correction_id = k.correction_id
"""


async def judged(
    connection: Connection, keys: Sequence[CorrectionKey]
) -> dict[CorrectionKey, JudgedCorrection]:
    """The usage consumer's verdict on each (tenant_id, correction_id) of `keys` it has judged
    (applied, or unknown once its wait ended); keys never judged are absent."""
    if not keys:
        return {}
    rows = await connection.fetch(_JUDGED, [k[0] for k in keys], [k[1] for k in keys])
    return {
        (row["tenant_id"], row["correction_id"]): JudgedCorrection(
            verdict=Verdict(row["verdict"]),
            correction=correction_of(row),
            won=row["won"],
            late=row["late"],
            billed_in=row["billed_in"],
            received_at=row["received_at"],
        )
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class CorrectionWrite:
    """One verdict to store: an applied correction with what it did, or an unknown one."""

    correction: Correction
    verdict: Verdict
    event_occurred_at: datetime | None = None
    won: bool = False
    late: bool = False
    from_deployment_id: str | None = None
    to_deployment_id: str | None = None
    charge_delta_usd: Decimal | None = None


class LostCorrectionRaceError(TransientError):
    """Another transaction judged one of the batch's corrections meanwhile; the batch is landed
    again and meets that verdict."""


_WRITE = """
    INSERT INTO usage_corrections AS c
        (tenant_id, correction_id, gateway_request_id, action, fields, reason, actor,
         occurred_at, event_occurred_at, verdict, won, late, from_deployment_id,
         to_deployment_id, charge_delta_usd)
    SELECT tenant_id, correction_id, gateway_request_id, action, fields::jsonb, reason, actor,
           occurred_at, event_occurred_at, verdict, won, late, from_deployment_id,
           to_deployment_id, charge_delta_usd
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::boolean[],
                $12::boolean[], $13::text[], $14::text[], $15::numeric[])
        AS u(tenant_id, correction_id, gateway_request_id, action, fields, reason, actor,
             occurred_at, event_occurred_at, verdict, won, late, from_deployment_id,
             to_deployment_id, charge_delta_usd)
    ORDER BY tenant_id COLLATE "C", correction_id COLLATE "C"
    ON CONFLICT (tenant_id, correction_id) DO UPDATE SET
        gateway_request_id = EXCLUDED.gateway_request_id, action = EXCLUDED.action,
        fields = EXCLUDED.fields, reason = EXCLUDED.reason, actor = EXCLUDED.actor,
        occurred_at = EXCLUDED.occurred_at, event_occurred_at = EXCLUDED.event_occurred_at,
        received_at = EXCLUDED.received_at, verdict = EXCLUDED.verdict, won = EXCLUDED.won,
        late = EXCLUDED.late, from_deployment_id = EXCLUDED.from_deployment_id,
        to_deployment_id = EXCLUDED.to_deployment_id,
        charge_delta_usd = EXCLUDED.charge_delta_usd
    WHERE c.verdict = 'unknown'
    RETURNING tenant_id, correction_id
"""


async def write_verdicts(connection: Connection, writes: Sequence[CorrectionWrite]) -> None:
    """Store each verdict (one per key); a key judged `unknown` before is judged again (a
    replay from the dead-letter topic), an `applied` one never changes. Raises
    LostCorrectionRaceError when a key was applied by another transaction meanwhile."""
    if not writes:
        return
    cs = [w.correction for w in writes]
    rows = await connection.fetch(
        _WRITE,
        [c.tenant_id for c in cs],
        [c.correction_id for c in cs],
        [c.gateway_request_id for c in cs],
        [c.action.value for c in cs],
        [json.dumps(c.fields_json()) for c in cs],
        [c.reason for c in cs],
        [c.actor for c in cs],
        [c.occurred_at for c in cs],
        [w.event_occurred_at for w in writes],
        [w.verdict.value for w in writes],
        [w.won for w in writes],
        [w.late for w in writes],
        [w.from_deployment_id for w in writes],
        [w.to_deployment_id for w in writes],
        [w.charge_delta_usd for w in writes],
    )
    if len(rows) != len(writes):
        written = {(row["tenant_id"], row["correction_id"]) for row in rows}
        lost = [c.key for c in cs if c.key not in written]
        raise LostCorrectionRaceError(
            f"corrections {lost[:5]} were judged by another worker meanwhile; landing again"
        )


# --- the events corrected --------------------------------------------------------------------


@dataclass(frozen=True)
class FoundEvents:
    """The stored events of some corrections, and how many needed the slow look-up."""

    rows: dict[EventKey, UsageRow]
    slow_lookups: int = 0


_EVENT_COLUMNS = ", ".join(f"e.{column}" for column in USAGE_EVENT_COLUMNS)
# One probe per correction, in one round trip (the single-node form): the Tier 1 row under the
# hint, else (the hint missing or wrong) the one under the window's time of the id, for the
# id's tenant only. LATERAL keeps each an index probe pruned at run time to the key's month and
# the id's hash slice, and LIMIT 1 leaves the window unread when the hint finds the row: the
# forms below make the planner scan the whole window for a batch's ids (~10 ms a batch at 200k).
_FIND = f"""
    SELECT e.* FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(tenant_id, id, hint)
    CROSS JOIN LATERAL (
        (SELECT {_EVENT_COLUMNS} FROM llm_usage_events AS e
         WHERE e.tenant_id = k.tenant_id AND e.occurred_at = k.hint
           AND e.gateway_request_id = k.id)
        UNION ALL
        (SELECT {_EVENT_COLUMNS} FROM usage_event_ids AS i
         JOIN llm_usage_events AS e
           ON e.tenant_id = i.tenant_id AND e.occurred_at = i.occurred_at
          AND e.gateway_request_id = i.gateway_request_id
         WHERE i.gateway_request_id = k.id AND i.tenant_id = k.tenant_id)
        LIMIT 1
    ) AS e
"""
# The same in the forms Citus accepts (it refuses a LATERAL subquery on a distributed table):
# the window's rows of the ids, by a join on its distribution column.
_WINDOW_TIMES = """
    SELECT i.gateway_request_id, i.tenant_id, i.occurred_at
    FROM unnest($1::text[]) AS ids(id)
    JOIN usage_event_ids AS i ON i.gateway_request_id = ids.id
"""
# The rows stored under candidate Tier 1 keys: the events by `= ANY` of the keys' arrays in a
# CTE, joined back to the keys (storage/event_ids.py's form for Citus; a batch has few
# corrections, so one form serves both).
_STORED_ROWS = f"""
    WITH k AS (
        SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[])
            AS k(tenant_id, occurred_at, id)
    ), e AS (
        SELECT * FROM llm_usage_events
        WHERE gateway_request_id = ANY($3::text[]) AND tenant_id = ANY($1::text[])
          AND occurred_at = ANY($2::timestamptz[])
    )
    SELECT {_EVENT_COLUMNS}
    FROM k JOIN e ON e.tenant_id = k.tenant_id AND e.occurred_at = k.occurred_at
                 AND e.gateway_request_id = k.id
"""
# The slow path, for a correction without a hint whose id left the window: the tenant's part of
# the Tier 1 index, month by month (design §5.1.3).
_FIND_SLOW = f"""
    SELECT {_EVENT_COLUMNS} FROM llm_usage_events AS e
    WHERE e.tenant_id = $1 AND e.gateway_request_id = $2
    LIMIT 1
"""


def _row(record: asyncpg.Record) -> UsageRow:
    return UsageRow(*(record[column] for column in USAGE_EVENT_COLUMNS))


async def find_events(
    connection: Connection, corrections: Sequence[Correction], *, citus: bool | None = None
) -> FoundEvents:
    """The stored event of each correction, by (tenant_id, gateway_request_id): the row under
    the Tier 1 key of the hint `event_occurred_at` or of the window's time of the id (the
    window's row is accepted only for its tenant, and only if the Tier 1 row exists), else (no
    hint) the slow look-up. `citus`: the database is a Citus coordinator (None: asked here)."""
    wanted: dict[EventKey, datetime | None] = {}
    for c in corrections:
        hint = wanted.get(c.event)
        wanted[c.event] = hint if hint is not None else c.event_occurred_at
    if not wanted:
        return FoundEvents({})
    keys = list(wanted)
    if citus is None:
        citus = await citus_installed(connection)
    rows = (
        await _find_on_citus(connection, wanted)
        if citus
        else {
            (found["tenant_id"], found["gateway_request_id"]): _row(found)
            for found in await connection.fetch(
                _FIND, [k[0] for k in keys], [k[1] for k in keys], [wanted[k] for k in keys]
            )
        }
    )
    slow = 0
    for key in keys:
        if key not in rows and wanted[key] is None:
            slow += 1
            walked = await connection.fetchrow(_FIND_SLOW, *key)
            if walked is not None:
                rows[key] = _row(walked)
    return FoundEvents(rows, slow)


async def _find_on_citus(
    connection: Connection, wanted: Mapping[EventKey, datetime | None]
) -> dict[EventKey, UsageRow]:
    """`find_events`' two probes in the forms Citus accepts: the window's times of the ids,
    then the Tier 1 rows under those and the hints."""
    keys = list(wanted)
    candidates: set[TierOneKey] = {
        (k[0], hint, k[1]) for k, hint in wanted.items() if hint is not None
    }
    for row in await connection.fetch(_WINDOW_TIMES, list({k[1] for k in keys})):
        if (row["tenant_id"], row["gateway_request_id"]) in wanted:  # the window: any tenant's
            candidates.add((row["tenant_id"], row["occurred_at"], row["gateway_request_id"]))
    rows: dict[EventKey, UsageRow] = {}
    if candidates:
        probe = list(candidates)
        for found in await connection.fetch(
            _STORED_ROWS, [k[0] for k in probe], [k[1] for k in probe], [k[2] for k in probe]
        ):
            rows[(found["tenant_id"], found["gateway_request_id"])] = _row(found)
    return rows


# --- the effective values --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectiveNow:
    """A corrected event's effective values, the rank of the correction that won, and how many
    corrections were applied to it."""

    effective: Effective
    winner: tuple[datetime, str]  # (occurred_at, correction_id)
    corrections: int


_EFFECTIVE_FIELDS = (
    "deployment_id",
    "user_id",
    "agent_id",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "customer_charge_usd",
    "customer_charge_cents",
    "charge_estimated",
    "voided",
)
_READ_EFFECTIVE = f"""
    SELECT f.tenant_id, f.occurred_at, f.gateway_request_id, f.winner_occurred_at, f.winner_id,
           f.corrections, {", ".join(f"f.{name}" for name in _EFFECTIVE_FIELDS)}
    FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS k(tenant_id, occurred_at, id)
    JOIN usage_event_effective AS f
      ON f.tenant_id = k.tenant_id AND f.occurred_at = k.occurred_at
     AND f.gateway_request_id = k.id
"""


async def effective_now(
    connection: Connection, keys: Sequence[TierOneKey]
) -> dict[TierOneKey, EffectiveNow]:
    """The effective row of each corrected event of `keys` (Tier 1 keys); uncorrected ones are
    absent."""
    if not keys:
        return {}
    rows = await connection.fetch(
        _READ_EFFECTIVE, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    )
    return {
        (row["tenant_id"], row["occurred_at"], row["gateway_request_id"]): EffectiveNow(
            Effective(**{name: row[name] for name in _EFFECTIVE_FIELDS}),
            (row["winner_occurred_at"], row["winner_id"]),
            row["corrections"],
        )
        for row in rows
    }


_WRITE_EFFECTIVE = f"""
    INSERT INTO usage_event_effective AS f
        (tenant_id, occurred_at, gateway_request_id, winner_occurred_at, winner_id, corrections,
         {", ".join(_EFFECTIVE_FIELDS)})
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[],
                         $5::text[], $6::integer[], $7::text[], $8::text[], $9::text[],
                         $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
                         $14::bigint[], $15::numeric[], $16::bigint[], $17::boolean[],
                         $18::boolean[])
        AS u(tenant_id, occurred_at, gateway_request_id, winner_occurred_at, winner_id,
             corrections, {", ".join(_EFFECTIVE_FIELDS)})
    ORDER BY tenant_id COLLATE "C", occurred_at, gateway_request_id COLLATE "C"
    ON CONFLICT (tenant_id, occurred_at, gateway_request_id) DO UPDATE SET
        winner_occurred_at = EXCLUDED.winner_occurred_at, winner_id = EXCLUDED.winner_id,
        corrections = EXCLUDED.corrections,
        {", ".join(f"{name} = EXCLUDED.{name}" for name in _EFFECTIVE_FIELDS)}
"""


async def write_effective(connection: Connection, rows: Mapping[TierOneKey, EffectiveNow]) -> None:
    """Store each event's effective values (insert or replace), keyed as the event."""
    if not rows:
        return
    keys = list(rows)
    values = [rows[k] for k in keys]
    await connection.execute(
        _WRITE_EFFECTIVE,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [v.winner[0] for v in values],
        [v.winner[1] for v in values],
        [v.corrections for v in values],
        *([getattr(v.effective, name) for v in values] for name in _EFFECTIVE_FIELDS),
    )


# --- waiting for the event -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waiting:
    """A correction parked until its event is stored, with its record byte for byte."""

    tenant_id: str
    correction_id: str
    gateway_request_id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    first_seen_at: datetime
    wait_until: datetime

    @classmethod
    def of(
        cls,
        record: ParkedRecord,
        correction: Correction,
        *,
        first_seen_at: datetime,
        wait_until: datetime,
    ) -> Waiting:
        """`correction` parked with the record that brought it, byte for byte."""
        return cls(
            tenant_id=correction.tenant_id,
            correction_id=correction.correction_id,
            gateway_request_id=correction.gateway_request_id,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            first_seen_at=first_seen_at,
            wait_until=wait_until,
        )


class ParkedRecord(Protocol):
    """What a parked correction keeps of its Kafka record (an aiokafka ConsumerRecord)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes: ...


_PARK = """
    INSERT INTO correction_waits
        (consumer, tenant_id, correction_id, gateway_request_id, record_topic, record_partition,
         record_offset, record_key, record_value, first_seen_at, wait_until)
    SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::integer[],
                             $7::bigint[], $8::bytea[], $9::bytea[], $10::timestamptz[],
                             $11::timestamptz[])
        AS u(tenant_id, correction_id, gateway_request_id, record_topic, record_partition,
             record_offset, record_key, record_value, first_seen_at, wait_until)
    ORDER BY tenant_id COLLATE "C", correction_id COLLATE "C"
    ON CONFLICT (consumer, tenant_id, correction_id) DO NOTHING
"""


async def park(connection: Connection, consumer: str, waits: Sequence[Waiting]) -> None:
    """Park corrections for `consumer` ('usage' or 'budget'); one already waiting stays as it
    was (its first sighting decides its deadline)."""
    if not waits:
        return
    await connection.execute(
        _PARK,
        consumer,
        [w.tenant_id for w in waits],
        [w.correction_id for w in waits],
        [w.gateway_request_id for w in waits],
        [w.topic for w in waits],
        [w.partition for w in waits],
        [w.offset for w in waits],
        [w.key for w in waits],
        [w.value for w in waits],
        [w.first_seen_at for w in waits],
        [w.wait_until for w in waits],
    )


async def forget_waits(
    connection: Connection, consumer: str, keys: Sequence[CorrectionKey]
) -> None:
    """Delete the waits of `keys` (applied or judged unknown)."""
    if keys:
        await connection.execute(
            "DELETE FROM correction_waits AS w USING unnest($2::text[], $3::text[]) AS k(t, c) "
            "WHERE w.consumer = $1 AND w.tenant_id = k.t AND w.correction_id = k.c",
            consumer,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )


# A replica retries only the records of the topic it consumes (None: of every topic).
_OF_TOPIC = "($T::text IS NULL OR record_topic = $T)"


# How many tenants' waiting corrections one retry transaction takes: a round is a few
# transactions rather than one per tenant (in bench budget ~100 tenants wait at once), each
# still about as large as a batch's share of corrections.
TENANTS_PER_RETRY = 100


async def waiting_tenants(
    connection: Connection, consumer: str, *, topic: str | None = None, limit: int = 1000
) -> list[list[str]]:
    """Tenants with corrections waiting for `consumer`, in groups of `TENANTS_PER_RETRY`: one
    retry transaction each."""
    rows = await connection.fetch(
        "SELECT DISTINCT tenant_id FROM correction_waits WHERE consumer = $1 AND "
        + _OF_TOPIC.replace("$T", "$3")
        + " LIMIT $2",
        consumer,
        limit,
        topic,
    )
    tenants = [row[0] for row in rows]
    return [
        tenants[start : start + TENANTS_PER_RETRY]
        for start in range(0, len(tenants), TENANTS_PER_RETRY)
    ]


async def waiting_events(
    connection: Connection,
    consumer: str,
    tenant_ids: Sequence[str],
    *,
    topic: str | None = None,
) -> list[EventKey]:
    """The events the tenants' waiting corrections name (to lock their buckets first)."""
    rows = await connection.fetch(
        "SELECT DISTINCT tenant_id, gateway_request_id FROM correction_waits "
        "WHERE consumer = $1 AND tenant_id = ANY($2::text[]) AND " + _OF_TOPIC.replace("$T", "$3"),
        consumer,
        list(tenant_ids),
        topic,
    )
    return [(row[0], row[1]) for row in rows]


_CLAIM_WAITS = (
    "SELECT tenant_id, correction_id, gateway_request_id, record_topic, record_partition, "
    "record_offset, record_key, record_value, first_seen_at, wait_until "
    "FROM correction_waits WHERE consumer = $1 AND tenant_id {tenants} AND "
    + _OF_TOPIC.replace("$T", "$3")
    + " ORDER BY first_seen_at, record_topic, record_partition, record_offset "
    "FOR UPDATE SKIP LOCKED"
)
_CLAIM_TENANTS_WAITS = _CLAIM_WAITS.format(tenants="= ANY($2::text[])")
# Citus locks rows (FOR UPDATE) only in a query routed to one shard: one tenant a statement.
_CLAIM_TENANT_WAITS = _CLAIM_WAITS.format(tenants="= $2")


async def claim_waits(
    connection: Connection,
    consumer: str,
    tenant_ids: Sequence[str],
    *,
    topic: str | None = None,
    citus: bool = False,
) -> list[Waiting]:
    """Lock the tenants' waiting corrections for the transaction, skipping rows another replica
    holds; in the order their records were first seen (tenant by tenant on Citus, a statement
    each). `citus`: the database is a Citus coordinator."""
    if not citus:
        rows = await connection.fetch(_CLAIM_TENANTS_WAITS, consumer, list(tenant_ids), topic)
        return [Waiting(*row) for row in rows]
    claimed: list[Waiting] = []
    for tenant_id in tenant_ids:
        rows = await connection.fetch(_CLAIM_TENANT_WAITS, consumer, tenant_id, topic)
        claimed.extend(Waiting(*row) for row in rows)
    return claimed


@dataclass(frozen=True, slots=True)
class WaitSummary:
    waiting: int
    oldest_first_seen_at: datetime | None


async def wait_summary(
    connection: Connection, consumer: str, *, topic: str | None = None
) -> WaitSummary:
    """How many corrections wait for `consumer`, and since when the oldest does."""
    row = await connection.fetchrow(
        "SELECT count(*), min(first_seen_at) FROM correction_waits WHERE consumer = $1 AND "
        + _OF_TOPIC.replace("$T", "$2"),
        consumer,
        topic,
    )
    assert row is not None
    return WaitSummary(row[0], row[1])
