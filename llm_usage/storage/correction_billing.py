"""Which late corrections a closed month's adjustment lines true up: named in the line's
`meta.correction_ids`, and stamped `billed_in` when the month that bills them closes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from llm_usage.storage.pool import Connection

# (tenant_id, deployment_id): the line a correction moves money onto or off.
LineOwner = tuple[str, str | None]
CorrectionKey = tuple[str, str]  # (tenant_id, correction_id)

_UNBILLED = """
    SELECT tenant_id, correction_id, from_deployment_id, to_deployment_id
    FROM usage_corrections
    WHERE tenant_id = ANY($1::text[]) AND late AND billed_in IS NULL AND verdict = 'applied'
      AND event_occurred_at >= $2 AND event_occurred_at < $3
"""


async def unbilled_corrections(
    connection: Connection, *, first_day: date, next_month: date, tenants: Sequence[str]
) -> dict[LineOwner, list[str]]:
    """The applied corrections of these tenants' events of [first_day, next_month) that came
    after the month closed and that no closed line has billed yet, by each line they move (the
    deployment before and after), ids sorted."""
    owners: dict[LineOwner, set[str]] = {}
    for row in await connection.fetch(_UNBILLED, list(tenants), first_day, next_month):
        for deployment in {row["from_deployment_id"], row["to_deployment_id"]}:
            owners.setdefault((row["tenant_id"], deployment), set()).add(row["correction_id"])
    return {owner: sorted(ids) for owner, ids in owners.items()}


async def mark_corrections_billed(
    connection: Connection, *, period: str, corrections: Sequence[CorrectionKey]
) -> None:
    """Stamp the corrections the closing `period`'s lines trued up (also those whose true-up
    came to 0 cents: they were considered, and appear on no line)."""
    if not corrections:
        return
    await connection.execute(
        "UPDATE usage_corrections AS c SET billed_in = $3 "
        "FROM unnest($1::text[], $2::text[]) AS k(tenant_id, correction_id) "
        "WHERE c.tenant_id = k.tenant_id AND c.correction_id = k.correction_id "
        "AND c.billed_in IS NULL",
        [tenant for tenant, _ in corrections],
        [correction_id for _, correction_id in corrections],
        period,
    )
