"""The spend counters' storage against a real PostgreSQL: which counters a batch adds to (the
same as the Python walk derives) and what one batch's addition costs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import NamedTuple

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_usage.consumers.budget.counting import contributions_to
from llm_usage.domain.budgets import BudgetWindow, period_start, scopes_of
from llm_usage.domain.periods import utc_day
from llm_usage.storage.budget_spend import add_to_counters, stage_events
from tests.integration.pipeline import unique

_NO_TOKENS = (0, 0, 0, 0, 0)  # the token counts only tell conflicts apart; counting ignores them
_HOT_UPDATES = "SELECT pg_stat_get_xact_tuples_hot_updated('budget_spend'::regclass)"
_UPDATES = "SELECT pg_stat_get_xact_tuples_updated('budget_spend'::regclass)"


async def _add_once_per_tenant(pool: asyncpg.Pool, tenants: list[str]) -> tuple[int, int]:
    """One batch with an event per tenant (two counters each: its day and its month); the
    updates and HOT updates of counter rows that batch made."""
    async with pool.acquire() as connection, connection.transaction():
        await stage_events(
            connection,
            (
                (
                    f"{tenant}-{unique('event')}",
                    tenant,
                    None,
                    None,
                    None,
                    date(2026, 11, 14),
                    Decimal("0.5"),
                    *_NO_TOKENS,
                    datetime(2026, 11, 14, 12, tzinfo=UTC),
                )
                for tenant in tenants
            ),
        )
        await add_to_counters(connection, evaluated_from=date.min, staged=True)
        return await connection.fetchval(_UPDATES), await connection.fetchval(_HOT_UPDATES)


async def test_a_batch_adding_to_every_counter_on_its_pages_updates_them_in_place(
    pool: asyncpg.Pool,
) -> None:
    # Enough counters to fill many pages: with full pages (fillfactor 100) next to none of the
    # updates below would find room beside the old version, and each would also add an index
    # entry.
    tenants = [unique("hot-tenant") for _ in range(3_000)]
    assert await _add_once_per_tenant(pool, tenants) == (0, 0)  # the counters are created

    updated, in_place = await _add_once_per_tenant(pool, tenants)

    assert updated == 2 * len(tenants)
    assert in_place >= 0.95 * updated, f"{in_place} of {updated} updates were HOT"
    spend = await pool.fetchval(
        "SELECT sum(spend_usd) FROM budget_spend WHERE tenant_id = ANY($1::text[])", tenants
    )
    assert spend == Decimal("0.5") * 2 * 2 * len(tenants)


class _Event(NamedTuple):
    gateway_request_id: str
    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    customer_charge_usd: Decimal
    occurred_at: datetime


_Drawn = tuple[str, str | None, str | None, str | None, Decimal, datetime]
_attribution = st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))
# Around a month end, a year end and a leap day, at offsets that move an event across them.
_moments = st.builds(
    lambda base, minutes, offset: (base + timedelta(minutes=minutes)).astimezone(
        timezone(timedelta(hours=offset))
    ),
    st.sampled_from(
        [
            datetime(2027, 1, 31, 23, 0, tzinfo=UTC),
            datetime(2026, 12, 31, 23, 0, tzinfo=UTC),
            datetime(2028, 2, 28, 23, 0, tzinfo=UTC),
        ]
    ),
    st.integers(min_value=0, max_value=2 * 24 * 60),
    st.integers(min_value=-12, max_value=14),
)
_charges = st.decimals(min_value=0, max_value=10**6, places=12, allow_nan=False)
_batches = st.lists(
    st.tuples(
        st.sampled_from(["t1", "t2"]), _attribution, _attribution, _attribution, _charges, _moments
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=60,
    deadline=None,
    # The pool is the session database's; each example rolls its own transaction back.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batch=_batches)
async def test_the_counters_postgresql_adds_are_those_the_python_walk_derives(
    pool: asyncpg.Pool,
    batch: list[tuple[str, str | None, str | None, str | None, Decimal, datetime]],
) -> None:
    run = unique("agree")
    events = [
        _Event(f"{run}-{n}", f"{run}-{tenant}", deployment, user, agent, charge, occurred)
        for n, (tenant, deployment, user, agent, charge, occurred) in enumerate(batch)
    ]
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            await stage_events(
                connection,
                (
                    (
                        e.gateway_request_id,
                        e.tenant_id,
                        e.deployment_id,
                        e.user_id,
                        e.agent_id,
                        utc_day(e.occurred_at),
                        e.customer_charge_usd,
                        *_NO_TOKENS,
                        e.occurred_at,
                    )
                    for e in events
                ),
            )
            await add_to_counters(connection, evaluated_from=date.min, staged=True)
            rows = await connection.fetch(
                'SELECT tenant_id, scope_type, scope_id, "window", period_start, spend_usd '
                "FROM budget_spend WHERE tenant_id LIKE $1",
                f"{run}-%",
            )
        finally:
            await transaction.rollback()

    in_postgresql = {tuple(row[:5]): row[5] for row in rows}
    # The rule spelled out: each scope the event names, in its own UTC day and month.
    derived = {
        (e.tenant_id, scope.value, scope_id, window.value, period_start(window, e.occurred_at))
        for e in events
        for scope, scope_id in scopes_of(e)
        for window in BudgetWindow
    }
    assert set(in_postgresql) == derived
    walked = contributions_to(in_postgresql, events)
    assert {
        key: sum((c.amount_usd for c in contributions), Decimal(0))
        for key, contributions in walked.items()
    } == in_postgresql
