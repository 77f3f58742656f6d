"""The exact daily pre-aggregate of stored usage, kept in the transaction that stores events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any

from llm_usage.domain.money import EXACT_CONTEXT
from llm_usage.domain.usage import Usage
from llm_usage.schemas.usage_event import UsageRow
from llm_usage.storage.pool import Connection

TotalsKey = tuple[str, str | None, date]  # tenant_id, deployment_id, UTC day


def daily_totals(events: Iterable[UsageRow]) -> dict[TotalsKey, Usage]:
    """Exact sums per (tenant, deployment, UTC day) of `events`."""
    # Summed in place in plain lists (a batch has thousands of events), then made values.
    sums: dict[TotalsKey, list[Any]] = {}
    add = EXACT_CONTEXT.add
    for event in events:
        # Decoding put occurred_at in UTC already.
        key = (event.tenant_id, event.deployment_id, event.occurred_at.date())
        found = sums.get(key)
        if found is None:
            sums[key] = [event.customer_charge_usd, event.input_tokens, event.output_tokens, 1]
        else:
            found[0] = add(found[0], event.customer_charge_usd)
            found[1] += event.input_tokens
            found[2] += event.output_tokens
            found[3] += 1
    return {key: Usage(*values) for key, values in sums.items()}


# Rows in sorted key order, so replicas adding to the same days lock them in the same order.
_ADD = """
    INSERT INTO usage_daily_totals AS t
        (tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests)
    SELECT tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests
    FROM unnest($1::text[], $2::text[], $3::date[], $4::numeric[], $5::bigint[], $6::bigint[],
                $7::bigint[])
        WITH ORDINALITY
        AS u(tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests, n)
    ORDER BY n
    ON CONFLICT ON CONSTRAINT usage_daily_totals_key DO UPDATE SET
        charge_usd = t.charge_usd + EXCLUDED.charge_usd,
        input_tokens = t.input_tokens + EXCLUDED.input_tokens,
        output_tokens = t.output_tokens + EXCLUDED.output_tokens,
        requests = t.requests + EXCLUDED.requests,
        updated_at = clock_timestamp()
"""


async def add_to_daily_totals(connection: Connection, totals: Mapping[TotalsKey, Usage]) -> None:
    """Add newly stored events' sums to the pre-aggregate; one statement."""
    if not totals:
        return
    keys = sorted(totals, key=lambda k: (k[0], k[1] is not None, k[1] or "", k[2]))
    await connection.execute(
        _ADD,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [totals[k].charge_usd for k in keys],
        [totals[k].input_tokens for k in keys],
        [totals[k].output_tokens for k in keys],
        [totals[k].requests for k in keys],
    )
