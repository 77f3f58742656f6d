"""Budget periods past the horizon are no longer evaluated: their spend counters, what checks
held on them, and their published alerts are deleted, in bounded batches, by `llm-usage
maintain` (the schema owner).

The horizon (domain/budgets.py `budget_horizon`): the current and the previous UTC month are
evaluated, with every day of them; anything older is not. A period is pruned only once it ended
at least a whole month ago (28 days or more): later than any late event of normal operation can
reach the budget consumer (the usage topic keeps 7 days, the id window is 192 hours, the
rollup's close grace 48 hours).
An alert of such a period that is not published yet is kept until the relay has published it;
the next run deletes it.

"Each alert at most once, ever" holds for every period inside the horizon: its counters and its
alert keys are all still there. For a period past it the outbox no longer remembers the alerts it
sent, so the budget consumer must not count events of such a period any more (an event that old
comes only from a replay of the dead-letter topic or a backfill): counting one would start its
counter again from zero and could send an alert of that period a second time.
"""

from __future__ import annotations

from datetime import date

from llm_usage.storage.pool import Connection

# Rows deleted by one statement: each batch commits on its own, so no lock is held for long and
# the budget consumer's upserts never wait behind a long delete.
PRUNE_BATCH_ROWS = 10_000

# The spend counters, and what checks held on them (budget_held, keyed the same way): a hold
# lasts minutes, so a period this old holds nothing any more.
_PRUNE_COUNTERS = tuple(
    f"""
    DELETE FROM {table}
    WHERE (tenant_id, scope_type, scope_id, "window", period_start) IN (
        SELECT tenant_id, scope_type, scope_id, "window", period_start FROM {table}
        WHERE period_start < $1
        LIMIT $2
    )
"""
    for table in ("budget_spend", "budget_held")
)

# What the budget consumer applied of corrections: a correction applied before the horizon
# corrects an event older still, which counts toward no period any more, so its record can go.
_PRUNE_CORRECTIONS = """
    DELETE FROM budget_corrections
    WHERE (tenant_id, correction_id) IN (
        SELECT tenant_id, correction_id FROM budget_corrections
        WHERE applied_at < $1
        LIMIT $2
    )
"""

# Walks the outbox by `seq` (its primary key) once: alerts of old periods are mostly old alerts,
# and an unpublished one is never deleted.
_PRUNE_ALERTS = """
    WITH pruned AS (
        DELETE FROM budget_alert_outbox
        WHERE seq IN (
            SELECT seq FROM budget_alert_outbox
            WHERE seq > $3 AND period_start < $1 AND published_at IS NOT NULL
            ORDER BY seq
            LIMIT $2
        )
        RETURNING seq
    )
    SELECT count(*) AS deleted, max(seq) AS last_seq FROM pruned
"""


async def prune_budget_periods(
    connection: Connection, *, before: date, batch_rows: int = PRUNE_BATCH_ROWS
) -> int:
    """Delete the spend counters of periods starting before `before`, what checks held on them,
    the budget consumer's records of corrections applied before it, and their alerts that were
    published, `batch_rows` at a time, each batch in a transaction of
    its own; return how many rows were deleted in all. Call it outside a transaction."""
    deleted = 0
    for prune in (*_PRUNE_COUNTERS, _PRUNE_CORRECTIONS):
        while True:
            status = await connection.execute(prune, before, batch_rows)
            count = int(status.rsplit(" ", 1)[-1])
            deleted += count
            if count < batch_rows:
                break
    last_seq = 0
    while True:
        row = await connection.fetchrow(_PRUNE_ALERTS, before, batch_rows, last_seq)
        assert row is not None
        count = int(row["deleted"])
        deleted += count
        if count < batch_rows:
            break
        last_seq = int(row["last_seq"])
    return deleted
