"""The exact per-attribute daily aggregate of stored usage (`usage_daily_dimensions`), kept in
the transaction that stores events, and filled from stored events where they were loaded
without it (migration 0011, the API benchmark's loader)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date
from decimal import Decimal, localcontext
from enum import StrEnum
from operator import attrgetter, itemgetter
from typing import Any, Final

from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.pool import Connection


class Dimension(StrEnum):
    """An attribute usage is broken down by, and the event column that holds it."""

    DEPLOYMENT = "deployment"
    MODEL = "model"
    PROVIDER = "provider"
    USER = "user"
    AGENT = "agent"
    CHANNEL = "channel"
    FEATURE = "feature"

    @property
    def column(self) -> str:
        return _COLUMNS[self]


_COLUMNS: Final = {
    Dimension.DEPLOYMENT: "deployment_id",
    Dimension.MODEL: "model",
    Dimension.PROVIDER: "provider",
    Dimension.USER: "user_id",
    Dimension.AGENT: "agent_id",
    Dimension.CHANNEL: "channel",
    Dimension.FEATURE: "feature",
}

# Each event's value of every dimension, as (dimension, key) rows (the events' alias is `e`).
_FAN_OUT: Final = (
    "CROSS JOIN LATERAL (VALUES "
    + ", ".join(f"('{d.value}', e.{d.column})" for d in Dimension)
    + ") AS v(dimension, key)"
)

# An event's figures the aggregate sums, besides its count: input, output, cached input,
# reasoning and total tokens, and the exact charge.
_FIGURES: Final = itemgetter(
    *(
        UsageRow._fields.index(name)
        for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens",
                     "total_tokens", "customer_charge_usd")
    )
)  # fmt: skip


def _charge(event: UsageRow) -> tuple[Decimal]:
    return (event.customer_charge_usd,)


_ZERO: Final = Decimal(0)
_VALUES: Final = tuple((d.value, attrgetter(d.column)) for d in Dimension)

DimensionKey = tuple[str, str, date, str | None]  # tenant_id, dimension, UTC day, key


def daily_dimensions(events: Sequence[UsageRow]) -> dict[DimensionKey, list[Any]]:
    """Exact sums per (tenant, dimension, UTC day, value) of `events`: [requests, input,
    output, cached input, reasoning, total tokens, charge, estimated charge]."""
    sums = _grouped_sums(events, _FIGURES)
    estimated = [e for e in events if e.charge_estimated]
    estimated_sums = _grouped_sums(estimated, _charge) if estimated else {}
    for key, figures in sums.items():
        found = estimated_sums.get(key)
        figures.append(_ZERO if found is None else found[1])
    return sums


def _grouped_sums(
    events: Sequence[UsageRow], figures_of: Callable[[UsageRow], Any]
) -> dict[DimensionKey, list[Any]]:
    # Grouped per dimension into lists of figures, then summed column-wise by builtins: about
    # a third of the time of adding each event's figures to seven running sums one by one.
    # Decoding put occurred_at in UTC already.
    tenant_days = [(e.tenant_id, e.occurred_at.date()) for e in events]
    figures = [figures_of(e) for e in events]
    sums: dict[DimensionKey, list[Any]] = {}
    with localcontext(EXACT_CONTEXT):  # the charges' sum() is exact
        for dimension, value_of in _VALUES:
            groups: dict[tuple[tuple[str, date], str | None], list[tuple[Any, ...]]] = {}
            values = map(value_of, events)
            for figure, tenant_day, value in zip(figures, tenant_days, values, strict=True):
                groups.setdefault((tenant_day, value), []).append(figure)
            for ((tenant_id, day), value), members in groups.items():
                sums[(tenant_id, dimension, day, value)] = [
                    len(members),
                    *map(sum, zip(*members, strict=True)),
                ]
    return sums


# Rows in the order the caller sorted them, so replicas adding to the same rows lock them in
# the same order. The DO UPDATE uses no function (Citus allows only IMMUTABLE ones there).
_ADD = """
    INSERT INTO usage_daily_dimensions AS d
        (tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
         cached_input_tokens, reasoning_tokens, total_tokens, charge_usd, estimated_charge_usd)
    SELECT tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
           cached_input_tokens, reasoning_tokens, total_tokens, charge_usd, estimated_charge_usd
    FROM unnest($1::text[], $2::text[], $3::date[], $4::text[], $5::bigint[], $6::bigint[],
                $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::numeric[],
                $12::numeric[])
        WITH ORDINALITY
        AS u(tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
             cached_input_tokens, reasoning_tokens, total_tokens, charge_usd,
             estimated_charge_usd, n)
    ORDER BY n
    ON CONFLICT ON CONSTRAINT usage_daily_dimensions_key DO UPDATE SET
        requests = d.requests + EXCLUDED.requests,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
        total_tokens = d.total_tokens + EXCLUDED.total_tokens,
        charge_usd = d.charge_usd + EXCLUDED.charge_usd,
        estimated_charge_usd = d.estimated_charge_usd + EXCLUDED.estimated_charge_usd
"""


# The rising step of a move (`move_daily_dimensions`): the same upsert, but a row whose rising
# figures are all 0 (it only falls) is locked in key order without being written; `_LOWER`
# writes it once.
_RAISE = (
    _ADD.rstrip()
    + """
    WHERE EXCLUDED.requests <> 0 OR EXCLUDED.input_tokens <> 0 OR EXCLUDED.output_tokens <> 0
       OR EXCLUDED.cached_input_tokens <> 0 OR EXCLUDED.reasoning_tokens <> 0
       OR EXCLUDED.total_tokens <> 0 OR EXCLUDED.charge_usd <> 0
       OR EXCLUDED.estimated_charge_usd <> 0
"""
)


async def add_to_daily_dimensions(
    connection: Connection, sums: Mapping[DimensionKey, Sequence[Any]]
) -> None:
    """Add newly stored events' `daily_dimensions` to the aggregate: one statement in the
    caller's transaction, after `add_to_daily_totals` (which took the months' locks)."""
    if not sums:
        return
    keys = _sorted_dimension_keys(sums)
    await connection.execute(
        _ADD,
        *([k[i] for k in keys] for i in range(4)),
        *([sums[k][i] for k in keys] for i in range(8)),
    )


def _sorted_dimension_keys(keys: Iterable[DimensionKey]) -> list[DimensionKey]:
    return sorted(keys, key=lambda k: (k[0], k[1], k[2], k[3] is not None, k[3] or ""))


# The falling figures of rows the same transaction's upsert has just locked (as in
# usage_totals._LOWER: the upsert cannot lower a row; a row lowered below zero is refused).
_LOWER = """
    UPDATE usage_daily_dimensions AS d SET
        requests = d.requests + u.requests,
        input_tokens = d.input_tokens + u.input_tokens,
        output_tokens = d.output_tokens + u.output_tokens,
        cached_input_tokens = d.cached_input_tokens + u.cached_input_tokens,
        reasoning_tokens = d.reasoning_tokens + u.reasoning_tokens,
        total_tokens = d.total_tokens + u.total_tokens,
        charge_usd = d.charge_usd + u.charge_usd,
        estimated_charge_usd = d.estimated_charge_usd + u.estimated_charge_usd
    FROM unnest($1::text[], $2::text[], $3::date[], $4::text[], $5::bigint[], $6::bigint[],
                $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::numeric[],
                $12::numeric[])
        AS u(tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
             cached_input_tokens, reasoning_tokens, total_tokens, charge_usd,
             estimated_charge_usd)
    WHERE d.tenant_id = u.tenant_id AND d.dimension = u.dimension AND d.day = u.day
      AND d.key IS NOT DISTINCT FROM u.key
"""


def _columns(keys: list[DimensionKey], sums: Mapping[DimensionKey, Sequence[Any]]) -> list[Any]:
    return [
        *([k[i] for k in keys] for i in range(4)),
        *([sums[k][i] for k in keys] for i in range(8)),
    ]


async def move_daily_dimensions(
    connection: Connection,
    net: Mapping[DimensionKey, Sequence[Any]],
    *,
    may_fall: Iterable[DimensionKey] | None = None,
) -> None:
    """Move the aggregate by signed sums (a batch's events plus its corrections' deltas), after
    `move_daily_totals` (which took the months' locks); for batches with corrections only.
    The upsert of every key's rising figures locks the rows in key order (writing only those
    that rise), then the falling figures lower the rows it locked. `may_fall`: the only keys
    that can hold a figure below 0, the corrections' (stored events' sums never do); None:
    any key."""
    keys = _sorted_dimension_keys(k for k, figures in net.items() if any(figures))
    if not keys:
        return
    # Only a correction's key can fall (a few hundred in a batch of thousands): the others
    # rise as they are.
    candidates = keys if may_fall is None else _sorted_dimension_keys(set(may_fall) & net.keys())
    lowered = [k for k in candidates if min(net[k]) < 0]
    falling = {k: [min(f, 0) for f in net[k]] for k in lowered}
    rising = {**net, **{k: [max(f, 0) for f in net[k]] for k in lowered}}
    await connection.execute(_RAISE, *_columns(keys, rising))
    if lowered:
        await connection.execute(_LOWER, *_columns(lowered, falling))


_FILL = f"""
    INSERT INTO usage_daily_dimensions AS d
        (tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
         cached_input_tokens, reasoning_tokens, total_tokens, charge_usd, estimated_charge_usd)
    SELECT e.tenant_id, v.dimension, (e.occurred_at AT TIME ZONE 'UTC')::date, v.key,
           count(*), sum(e.input_tokens), sum(e.output_tokens), sum(e.cached_input_tokens),
           sum(e.reasoning_tokens), sum(e.total_tokens), sum(e.customer_charge_usd),
           coalesce(sum(e.customer_charge_usd) FILTER (WHERE e.charge_estimated), 0)
    FROM llm_usage_events AS e
    {_FAN_OUT}
    WHERE $1::text[] IS NULL OR e.tenant_id = ANY($1::text[])
    GROUP BY e.tenant_id, v.dimension, (e.occurred_at AT TIME ZONE 'UTC')::date, v.key
    ON CONFLICT ON CONSTRAINT usage_daily_dimensions_key DO UPDATE SET
        requests = EXCLUDED.requests,
        input_tokens = EXCLUDED.input_tokens,
        output_tokens = EXCLUDED.output_tokens,
        cached_input_tokens = EXCLUDED.cached_input_tokens,
        reasoning_tokens = EXCLUDED.reasoning_tokens,
        total_tokens = EXCLUDED.total_tokens,
        charge_usd = EXCLUDED.charge_usd,
        estimated_charge_usd = EXCLUDED.estimated_charge_usd
"""


async def fill_from_events(
    connection: Connection, *, tenant_ids: Sequence[str] | None = None
) -> None:
    """Set the aggregate's rows of `tenant_ids` (None: every tenant) to the sums of their stored
    events: for events loaded straight into `llm_usage_events`. Running it again changes
    nothing; no usage consumer may be storing those tenants' events meanwhile."""
    await connection.execute(_FILL, None if tenant_ids is None else list(tenant_ids))


async def forget_days(connection: Connection, first_day: date, end_day: date) -> None:
    """Delete every tenant's aggregate rows of the days [first_day, end_day): a month whose
    events are retired must not be reported from the aggregate while its raw events are gone."""
    await connection.execute(
        "DELETE FROM usage_daily_dimensions WHERE day >= $1 AND day < $2", first_day, end_day
    )
