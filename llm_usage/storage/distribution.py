"""On Citus, the schema's tables become distributed or reference tables (`llm-usage migrate`).

Run after the migrations, only where the `citus` extension is installed (a plain PostgreSQL is
left alone). Idempotent: a table already distributed is skipped, so every `migrate` may call it,
and a table a later migration adds is distributed by the next run. Each table is distributed in
its own statement (Citus copies its rows to the workers, then empties the coordinator's copy);
an interrupted run is finished by running it again.

The plan is data, below: which tables are spread across the workers on which column, which are
copied whole to every node, and which stay on the coordinator and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_usage.core.errors import UserFacingError
from llm_usage.storage.pool import Connection


@dataclass(frozen=True)
class Distributed:
    """Rows spread over the workers by the hash of `column`; tables of one `colocate_with` group
    keep a tenant's rows on the same worker, so a batch's writes and a tenant's reports stay
    on one node. The first table of a group says how many shards the group has (`colocate_with`
    "none": a new group); the others name that table in `colocate_with` and follow it."""

    table: str
    column: str
    colocate_with: str = "none"
    shard_count: int | None = None


@dataclass(frozen=True)
class Reference:
    """Small tables every node reads: a copy on every node, written everywhere at once."""

    table: str


# Shards per group. Every shard of a table a batch writes is one more statement on a worker, and
# each partition of a partitioned table has its own shards: with Citus's default of 32, the id
# window's 16 hash partitions are 512 shards, and a batch of 1,000 events (window + events +
# daily totals) took ~400 ms through the coordinator against ~30 ms on one node (2 workers on
# the same 2 cores). With these counts: ~70 ms for 1,000 events, ~180 ms for 5,000 (one node:
# ~150-180 ms). More workers want more shards (at least one per worker core); changing the
# count later rewrites the table (`alter_distributed_table(..., shard_count => n)`).
TENANT_SHARDS = 8
ID_WINDOW_SHARDS = 4

# In this order: a group's first table before the tables co-located with it.
DISTRIBUTED: tuple[Distributed, ...] = (
    # Events and everything keyed by tenant: one tenant's rows on one worker.
    Distributed("llm_usage_events", "tenant_id", shard_count=TENANT_SHARDS),
    Distributed("usage_daily_totals", "tenant_id", "llm_usage_events"),
    Distributed("usage_daily_dimensions", "tenant_id", "llm_usage_events"),
    Distributed("budget_spend", "tenant_id", "llm_usage_events"),
    Distributed("budget_policies", "tenant_id", "llm_usage_events"),
    Distributed("usage_late_marks", "tenant_id", "llm_usage_events"),
    Distributed("period_charges", "tenant_id", "llm_usage_events"),
    # A budget check's statements all name its tenant: each runs on the tenant's worker, with
    # that tenant's spend counters and policies.
    Distributed("budget_holds", "tenant_id", "llm_usage_events"),
    Distributed("budget_held", "tenant_id", "llm_usage_events"),
    # Corrections (issue 24): a correction is applied in the tenant's batch, beside its event.
    Distributed("usage_corrections", "tenant_id", "llm_usage_events"),
    Distributed("usage_event_effective", "tenant_id", "llm_usage_events"),
    Distributed("correction_waits", "tenant_id", "llm_usage_events"),
    Distributed("budget_corrections", "tenant_id", "llm_usage_events"),
    # The id window is keyed on the id alone, whatever the tenant: its own group.
    Distributed("usage_event_ids", "gateway_request_id", shard_count=ID_WINDOW_SHARDS),
    # The budget consumer's ids from before the window (read until they age out).
    Distributed("budget_counted_legacy", "gateway_request_id", "usage_event_ids"),
)

REFERENCE: tuple[Reference, ...] = (
    Reference("usage_event_months"),
    Reference("budget_alert_relay_positions"),
    # Keyed on a bigserial without tenant_id, which a table distributed on tenant_id cannot
    # have ("Distributed relations cannot have UNIQUE, EXCLUDE, or PRIMARY KEY constraints that
    # do not include the partition column"); both are small (policy changes, alerts).
    Reference("budget_policy_audit"),
    Reference("budget_alert_outbox"),
    # Read by every consumer to price events, changed rarely and by people: a copy on every
    # node lets a worker's batch join it locally. The audit is keyed on a bigserial as above.
    Reference("prices"),
    Reference("price_changes"),
)

# Stay on the coordinator as plain tables (Citus may still read and write them in a transaction
# with distributed ones), each for a reason Citus gives:
LOCAL: dict[str, str] = {
    # The migrations' own bookkeeping: read and written by `migrate` on the coordinator only.
    "schema_migrations": "read and written by `llm-usage migrate` alone",
    # Closed months are frozen by triggers, which Citus refuses on distributed and reference
    # tables ("cannot distribute relation ... because it has triggers").
    "invoice_periods": "its triggers freeze closed months; Citus refuses triggers",
    "invoice_lines": "its triggers freeze closed months; Citus refuses triggers",
}


async def distribute(connection: Connection) -> list[str]:
    """Distribute what DISTRIBUTED and REFERENCE name and exists, unless it already is; return
    the tables distributed now, each as `table (how)`.

    UserFacingError, with Citus's reason, when Citus refuses a table (then nothing more is
    distributed; what was is kept, and a run after the fix goes on from there).
    """
    import asyncpg  # noqa: PLC0415 - the error types, when Citus is there

    if await _unpartitioned_events(connection):
        raise UserFacingError(
            "llm_usage_events is not partitioned yet (a schema from before monthly partitions): "
            "Citus can distribute it on tenant_id only with its key containing tenant_id; "
            "apply every migration first"
        )
    done: list[str] = []
    plans: tuple[Distributed | Reference, ...] = (*DISTRIBUTED, *REFERENCE)
    for plan in plans:
        try:
            how = await _distribute_one(connection, plan)
        except asyncpg.PostgresError as error:
            detail = getattr(error, "detail", None)
            raise UserFacingError(
                f"Citus refuses to distribute {plan.table}: {error}"
                + (f" ({detail})" if detail else "")
                + (f"; distributed before it: {', '.join(done)}" if done else "")
            ) from None
        if how is not None:
            done.append(f"{plan.table} ({how})")
    return done


async def _distribute_one(connection: Connection, plan: Distributed | Reference) -> str | None:
    """Distribute one table unless it is missing or distributed already; say how, or None."""
    if not await _exists(connection, plan.table) or await _distributed(connection, plan.table):
        return None
    if isinstance(plan, Distributed) and plan.shard_count is not None:
        await connection.execute(
            "SELECT create_distributed_table($1, $2, colocate_with => 'none', shard_count => $3)",
            plan.table,
            plan.column,
            plan.shard_count,
        )
        how = f"on {plan.column}, {plan.shard_count} shards"
    elif isinstance(plan, Distributed):
        await connection.execute(
            "SELECT create_distributed_table($1, $2, colocate_with => $3)",
            plan.table,
            plan.column,
            plan.colocate_with,
        )
        how = f"on {plan.column}, with {plan.colocate_with}"
    else:
        await connection.execute("SELECT create_reference_table($1)", plan.table)
        how = "reference"
    # The rows now live on the workers; the coordinator's own copy is dead weight.
    await connection.execute("SELECT truncate_local_data_after_distributing_table($1)", plan.table)
    return how


async def _unpartitioned_events(connection: Connection) -> bool:
    kind = await connection.fetchval(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('llm_usage_events')"
    )
    return kind == b"r" and not await _distributed(connection, "llm_usage_events")


async def _exists(connection: Connection, table: str) -> bool:
    return await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", table) is True


async def _distributed(connection: Connection, table: str) -> bool:
    return bool(
        await connection.fetchval(
            "SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass($1)", table
        )
    )
