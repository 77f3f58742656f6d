"""`llm-usage policy` and `budget status` on a real PostgreSQL: every change audited with its
old and new policy in the change's own transaction, a chain even under concurrent sets, a
NOTIFY on commit, and status read from the spend counters of the current periods only."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from llm_usage.domain.budgets import (
    BudgetLevel,
    BudgetWindow,
    Enforcement,
    ScopeType,
    period_start,
)
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.storage.budget_policies import (
    NOTIFY_CHANNEL,
    delete_policy,
    policy_history,
    set_policy,
    tenant_policies,
)
from llm_usage.storage.budget_status import tenant_budget_status
from tests import clock
from tests.integration.pipeline import unique, wait_until

D = Decimal
BLOCK = Enforcement.BLOCK


@dataclass(frozen=True)
class Finished:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"


async def llm_usage(database_url: str, *args: str) -> Finished:
    """Run `python -m llm_usage ARGS` against `database_url` to its end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        *args,
        env={**os.environ, "DATABASE_URL": database_url, "LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


async def history(database_url: str, tenant_id: str) -> list[dict[str, Any]]:
    finished = await llm_usage(database_url, "policy", "history", "--tenant", tenant_id, "--json")
    assert finished.code == 0, finished
    return [json.loads(line) for line in finished.out.splitlines()]


def assert_chain(entries: list[dict[str, Any]]) -> None:
    """Per scope, each change starts from the policy the one before it left."""
    last: dict[tuple[str, str], Any] = {}
    for entry in entries:
        scope = (entry["scope_type"], entry["scope_id"])
        assert entry["old_policy"] == last.get(scope), entries
        last[scope] = entry["new_policy"]


def policy_json(
    tenant_id: str,
    daily: str | None,
    monthly: str | None,
    pct: int = 80,
    *,
    scope: tuple[str, str] | None = None,
    enforcement: str = "alert",
) -> dict[str, Any]:
    scope_type, scope_id = scope or ("tenant", tenant_id)
    return {
        "tenant_id": tenant_id,
        "scope_type": scope_type,
        "scope_id": scope_id,
        "daily_limit_usd": daily,
        "monthly_limit_usd": monthly,
        "warn_threshold_pct": pct,
        "enforcement": enforcement,
    }


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[asyncio.Queue[str]]:
    """Payloads of `NOTIFY budget_policies` as a LISTENing connection receives them."""
    received: asyncio.Queue[str] = asyncio.Queue()
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database_url)

    def on_notify(_connection: object, _pid: int, _channel: str, payload: object) -> None:
        received.put_nowait(str(payload))

    await connection.add_listener(NOTIFY_CHANNEL, on_notify)
    try:
        yield received
    finally:
        await connection.remove_listener(NOTIFY_CHANNEL, on_notify)
        await connection.close()


async def notified(received: asyncio.Queue[str], tenant_id: str, *, within: float) -> bool:
    """Whether a notification for `tenant_id` arrives within `within` seconds (others are
    dropped: the database is shared by the session)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (left := deadline - loop.time()) > 0:
        try:
            payload = await asyncio.wait_for(received.get(), left)
        except TimeoutError:
            return False
        if payload == tenant_id:
            return True
    return False


async def test_set_replace_and_delete_are_audited_old_to_new_exactly(
    pool: asyncpg.Pool, database_url: str
) -> None:
    tenant = unique("t-audit")
    base = ["--tenant", tenant, "--scope", "tenant"]

    created = await llm_usage(
        database_url, "policy", "set", *base, "--daily-limit-usd", "100.50", "--actor", "alice"
    )
    assert created.code == 0, created
    assert created.out == (
        f"created tenant {tenant!r} of tenant {tenant!r}: "
        "daily 100.5 USD, monthly -, warning at 80%\n"
    )
    # A replacement is whole: the daily limit it leaves out is removed. No --actor: the OS user.
    replaced = await llm_usage(
        database_url,
        "policy",
        "set",
        *base,
        "--scope-id",
        tenant,
        "--monthly-limit-usd",
        "0.000000000000000001",
        "--warn-pct",
        "95",
    )
    assert replaced.code == 0, replaced
    assert replaced.out.startswith(f"replaced tenant {tenant!r}")
    assert "(was: daily 100.5 USD, monthly -, warning at 80%)" in replaced.out
    # The same policy again (spelled differently) changes nothing and audits nothing.
    same = await llm_usage(
        database_url, "policy", "set", *base, "--monthly-limit-usd", "1E-18", "--warn-pct", "95"
    )
    assert same.code == 0, same
    assert same.out.startswith("unchanged ")

    listed = await llm_usage(database_url, "policy", "list", "--tenant", tenant, "--json")
    assert [json.loads(line) for line in listed.out.splitlines()] == [
        policy_json(tenant, None, "0.000000000000000001", 95)
    ]

    deleted = await llm_usage(database_url, "policy", "delete", *base, "--actor", "bob the admin")
    assert deleted.code == 0, deleted
    assert deleted.out.startswith(f"deleted tenant {tenant!r}")
    missing = await llm_usage(database_url, "policy", "delete", *base, "--actor", "bob")
    assert missing.code == 2, missing
    assert missing.err.count("\n") == 1
    assert "has no tenant policy" in missing.err
    assert "nothing deleted" in missing.err

    entries = await history(database_url, tenant)
    assert [(e["actor"], e["old_policy"], e["new_policy"]) for e in entries] == [
        ("alice", None, policy_json(tenant, "100.5", None)),
        (
            getpass.getuser(),
            policy_json(tenant, "100.5", None),
            policy_json(tenant, None, "0.000000000000000001", 95),
        ),
        ("bob the admin", policy_json(tenant, None, "0.000000000000000001", 95), None),
    ]
    times = [datetime.fromisoformat(e["changed_at"]) for e in entries]
    assert times == sorted(times)
    assert all(e["changed_at"].endswith("Z") for e in entries)
    # The stored audit holds exact decimal strings, never JSON numbers.
    raw = await pool.fetch(
        "SELECT new_policy::text FROM budget_policy_audit WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    assert '"daily_limit_usd": "100.5"' in raw[0]["new_policy"]

    table = await llm_usage(database_url, "policy", "history", "--tenant", tenant)
    lines = table.out.splitlines()
    assert lines[0].split() == ["CHANGED_AT", "ACTOR", "SCOPE", "OLD", "NEW"]
    assert len(lines) == 4
    async with pool.acquire() as connection:
        assert await tenant_policies(connection, tenant) == []


async def test_enforcement_is_set_described_and_audited(database_url: str) -> None:
    tenant = unique("t-block")
    base = ["policy", "set", "--tenant", tenant, "--scope", "agent", "--scope-id", "bot"]
    limits = ["--daily-limit-usd", "3", "--actor", "alice"]
    created = await llm_usage(database_url, *base, *limits, "--enforcement", "block")
    assert created.code == 0, created
    assert created.out.endswith("daily 3 USD, monthly -, warning at 80%, blocking checks\n")
    # Back to alert (the default): a change of enforcement alone is audited.
    relaxed = await llm_usage(database_url, *base, *limits)
    assert relaxed.code == 0, relaxed
    assert relaxed.out.startswith("replaced ")
    assert "(was: daily 3 USD, monthly -, warning at 80%, blocking checks)" in relaxed.out
    listed = await llm_usage(database_url, "policy", "list", "--tenant", tenant, "--json")
    assert [json.loads(line)["enforcement"] for line in listed.out.splitlines()] == ["alert"]
    scope = ("agent", "bot")
    assert [(e["old_policy"], e["new_policy"]) for e in await history(database_url, tenant)] == [
        (None, policy_json(tenant, "3", None, scope=scope, enforcement="block")),
        (
            policy_json(tenant, "3", None, scope=scope, enforcement="block"),
            policy_json(tenant, "3", None, scope=scope),
        ),
    ]


async def test_an_audit_entry_from_before_enforcement_reads_as_alert(
    pool: asyncpg.Pool, database_url: str
) -> None:
    tenant = unique("t-old-audit")
    older = policy_json(tenant, "7", None)
    del older["enforcement"]
    await pool.execute(
        "INSERT INTO budget_policy_audit (tenant_id, scope_type, scope_id, changed_at, actor, "
        "old_policy, new_policy) VALUES ($1, 'tenant', $1, now(), 'before', NULL, $2::jsonb)",
        tenant,
        json.dumps(older),
    )
    table = await llm_usage(database_url, "policy", "history", "--tenant", tenant)
    assert table.code == 0, table
    assert table.out.splitlines()[1].endswith("daily 7 USD, monthly -, warning at 80%")


async def test_policy_list_is_an_aligned_table_in_scope_order(
    pool: asyncpg.Pool, database_url: str
) -> None:
    tenant = unique("t-list")
    async with pool.acquire() as connection:
        for policy in (
            BudgetPolicy(tenant, ScopeType.USER, "u-1", None, D("250"), 90),
            BudgetPolicy(tenant, ScopeType.DEPLOYMENT, "dep-b", D("12.5"), D("300")),
            BudgetPolicy(tenant, ScopeType.TENANT, tenant, D("1000"), enforcement=BLOCK),
            BudgetPolicy(tenant, ScopeType.DEPLOYMENT, "dep-a", D("0.000000000000000001")),
        ):
            await set_policy(connection, policy, actor="test")

    listed = await llm_usage(database_url, "policy", "list", "--tenant", tenant)
    assert listed.code == 0, listed
    assert len(tenant) == 17  # the widest scope id: the table below is laid out for it
    assert listed.out.splitlines() == [
        "SCOPE_TYPE  SCOPE_ID                DAILY_LIMIT_USD  MONTHLY_LIMIT_USD  WARN_PCT  "
        "ENFORCEMENT",
        f"tenant      {tenant}                  1000                  -        80  block",
        "deployment  dep-a              0.000000000000000001                  -        80  alert",
        "deployment  dep-b                              12.5                300        80  alert",
        "user        u-1                                   -                250        90  alert",
    ]
    empty = await llm_usage(database_url, "policy", "list", "--tenant", unique("t-none"))
    assert empty.code == 0, empty
    assert empty.out.endswith("has no budget policies\n")


async def test_a_tenants_policies_come_back_as_set_in_scope_order(pool: asyncpg.Pool) -> None:
    tenant, other = unique("t-load"), unique("t-load")
    mine = [
        BudgetPolicy(tenant, ScopeType.TENANT, tenant, D("100")),
        BudgetPolicy(tenant, ScopeType.DEPLOYMENT, "dep-7", None, D("2000.25"), 50),
        BudgetPolicy(tenant, ScopeType.AGENT, "bot", D("3")),
    ]
    theirs = BudgetPolicy(other, ScopeType.DEPLOYMENT, "dep-7", D("1"))
    async with pool.acquire() as connection:
        for policy in (mine[2], theirs, mine[0], mine[1]):
            await set_policy(connection, policy, actor="test")

        found = await tenant_policies(connection, tenant)
        assert found == mine
        assert found[1].monthly_limit_usd == D("2000.25")
        assert await tenant_policies(connection, other) == [theirs]
        assert await tenant_policies(connection, unique("t-none")) == []


async def test_an_audit_row_exists_only_if_its_change_committed(
    pool: asyncpg.Pool, listener: asyncio.Queue[str]
) -> None:
    tenant = unique("t-rollback")
    policy = BudgetPolicy(tenant, ScopeType.TENANT, tenant, D("5"))
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        await set_policy(connection, policy, actor="test")
        await transaction.rollback()
        assert await tenant_policies(connection, tenant) == []
        assert await policy_history(connection, tenant) == []
        assert not await notified(listener, tenant, within=0.5)

        change = await delete_policy(
            connection, tenant_id=tenant, scope_type=ScopeType.TENANT, scope_id=tenant, actor="t"
        )
        assert change.old is None
        assert not change.changed
        assert await policy_history(connection, tenant) == []


async def test_a_set_notifies_listeners_with_the_tenant_id(
    database_url: str, pool: asyncpg.Pool, listener: asyncio.Queue[str]
) -> None:
    tenant = unique("t-notify")
    finished = await llm_usage(
        database_url,
        "policy",
        "set",
        "--tenant",
        tenant,
        "--scope",
        "deployment",
        "--scope-id",
        "dep-1",
        "--daily-limit-usd",
        "10",
    )
    assert finished.code == 0, finished
    assert await notified(listener, tenant, within=5)

    # An unchanged set notifies nobody; a delete does.
    async with pool.acquire() as connection:
        policy = BudgetPolicy(tenant, ScopeType.DEPLOYMENT, "dep-1", D("10.000"))
        assert not (await set_policy(connection, policy, actor="test")).changed
        assert not await notified(listener, tenant, within=0.5)
        await delete_policy(
            connection,
            tenant_id=tenant,
            scope_type=ScopeType.DEPLOYMENT,
            scope_id="dep-1",
            actor="test",
        )
    assert await notified(listener, tenant, within=5)


async def blocked_behind(pool: asyncpg.Pool, blocker_pid: int) -> int:
    """Sessions waiting for `blocker_pid`, directly or behind another waiter."""
    count = await pool.fetchval(
        """
        WITH RECURSIVE waiting (pid) AS (
            SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))
            UNION
            SELECT activity.pid
            FROM pg_stat_activity AS activity
            JOIN waiting ON waiting.pid = ANY(pg_blocking_pids(activity.pid))
        )
        SELECT count(*) FROM waiting
        """,
        blocker_pid,
    )
    return int(count)


@pytest.mark.parametrize("existing", [False, True], ids=["creating", "replacing"])
async def test_concurrent_set_processes_are_both_audited_as_one_chain(
    database_url: str, pool: asyncpg.Pool, *, existing: bool
) -> None:
    """Two `policy set` processes at once on the same scope, while a third transaction holds
    it: the policy is not there yet (both race to insert it), or it is (both wait to lock it)."""
    tenant = unique("t-race")
    first = BudgetPolicy(tenant, ScopeType.USER, "u-1", D("1"))
    holder: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database_url)
    try:
        if existing:
            await set_policy(holder, first, actor="holder")
        async with holder.transaction():
            # Uncommitted: a new row both must wait for, or a new version of the locked one.
            await set_policy(
                holder, BudgetPolicy(tenant, ScopeType.USER, "u-1", D("2")), actor="holder"
            )
            setters = [
                asyncio.create_task(
                    llm_usage(
                        database_url,
                        "policy", "set", "--tenant", tenant, "--scope", "user", "--scope-id", "u-1",
                        "--monthly-limit-usd", limit, "--actor", actor,
                    )
                )
                for limit, actor in (("30", "proc-a"), ("40", "proc-b"))
            ]  # fmt: skip
            pid = int(await holder.fetchval("SELECT pg_backend_pid()"))

            async def both_waiting() -> bool:
                return await blocked_behind(pool, pid) == 2

            await wait_until(both_waiting, within=30, message="both setters wait for the lock")
        finished = await asyncio.gather(*setters)
    finally:
        await holder.close()

    assert [f.code for f in finished] == [0, 0], [str(f) for f in finished]
    entries = await history(database_url, tenant)
    assert_chain(entries)
    actors = [entry["actor"] for entry in entries]
    assert actors[: len(actors) - 2] == ["holder"] * (len(actors) - 2)
    assert sorted(actors[-2:]) == ["proc-a", "proc-b"]
    assert len(entries) == (3 if not existing else 4)
    assert entries[-2]["old_policy"] == policy_json(tenant, "2", None, scope=("user", "u-1"))
    async with pool.acquire() as connection:
        final = await tenant_policies(connection, tenant)
    assert [entries[-1]["new_policy"]] == [policy.to_json() for policy in final]


async def test_many_concurrent_sets_of_one_scope_leave_a_consistent_chain(
    database_url: str,
) -> None:
    tenant = unique("t-many")
    connections = [await asyncpg.connect(database_url) for _ in range(8)]
    try:

        async def set_many(connection: asyncpg.Connection[asyncpg.Record], index: int) -> None:
            for round_ in range(5):
                limit = D(index * 100 + round_ + 1)
                await set_policy(
                    connection,
                    BudgetPolicy(tenant, ScopeType.AGENT, "bot", limit),
                    actor=f"writer-{index}",
                )
            if index % 2:
                await delete_policy(
                    connection,
                    tenant_id=tenant,
                    scope_type=ScopeType.AGENT,
                    scope_id="bot",
                    actor=f"writer-{index}",
                )

        await asyncio.gather(*(set_many(c, i) for i, c in enumerate(connections)))
        entries = [entry.to_json() for entry in await policy_history(connections[0], tenant)]
        final = await tenant_policies(connections[0], tenant)
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    assert len(entries) >= 40
    assert_chain(entries)
    assert [p.to_json() for p in final] == (
        [] if entries[-1]["new_policy"] is None else [entries[-1]["new_policy"]]
    )


async def insert_spend(
    pool: asyncpg.Pool,
    tenant: str,
    scope: tuple[str, str],
    *,
    window: BudgetWindow,
    start: date,
    spend: str,
) -> None:
    await pool.execute(
        'INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, '
        "spend_usd) VALUES ($1, $2, $3, $4, $5, $6)",
        tenant,
        *scope,
        window.value,
        start,
        D(spend),
    )


async def insert_held(
    pool: asyncpg.Pool,
    tenant: str,
    scope: tuple[str, str],
    *,
    window: BudgetWindow,
    start: date,
    placed: str,
    ended: str,
) -> None:
    await pool.execute(
        'INSERT INTO budget_held (tenant_id, scope_type, scope_id, "window", period_start, '
        "placed_usd, ended_usd) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        tenant,
        *scope,
        window.value,
        start,
        D(placed),
        D(ended),
    )


async def test_status_reads_the_current_periods_counters_at_their_exact_thresholds(
    pool: asyncpg.Pool,
) -> None:
    tenant, other = unique("t-status"), unique("t-status")
    now = datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC)  # the first instant of a day and a month
    today, month = date(2026, 3, 1), date(2026, 3, 1)
    async with pool.acquire() as connection:
        for policy in (
            BudgetPolicy(tenant, ScopeType.TENANT, tenant, D("100"), D("1000"), 80),
            BudgetPolicy(tenant, ScopeType.DEPLOYMENT, "dep-a", D("5"), None, 50, BLOCK),
            BudgetPolicy(tenant, ScopeType.USER, "u-1", None, D("200")),
            BudgetPolicy(tenant, ScopeType.AGENT, "bot", D("3")),
        ):
            await set_policy(connection, policy, actor="test")
    daily, monthly = BudgetWindow.DAILY, BudgetWindow.MONTHLY
    for owner, scope, window, start, spend in [
        (tenant, ("tenant", tenant), daily, today, "80"),  # exactly the warning threshold
        (tenant, ("tenant", tenant), monthly, month, "1000.00"),  # exactly the limit
        # Earlier periods, scopes without a policy, other tenants: never shown.
        (tenant, ("tenant", tenant), monthly, date(2026, 2, 1), "9999"),
        (tenant, ("tenant", tenant), daily, date(2026, 2, 28), "99"),
        (tenant, ("deployment", "dep-a"), daily, today, "2.4999"),
        (tenant, ("deployment", "dep-a"), monthly, month, "7"),  # no monthly limit
        (tenant, ("user", "u-1"), monthly, month, "159.999"),
        (tenant, ("user", "u-2"), monthly, month, "500"),
        (other, ("agent", "bot"), daily, today, "3"),
    ]:
        await insert_spend(pool, owner, scope, window=window, start=start, spend=spend)
    # What open holds keep back: placed - ended, of the current period's counter only.
    for owner, scope, window, start, placed, ended in [
        (tenant, ("tenant", tenant), daily, today, "12.5", "2.25"),
        (tenant, ("tenant", tenant), monthly, month, "3", "3"),  # every hold ended
        (tenant, ("tenant", tenant), monthly, date(2026, 2, 1), "40", "0"),
        (tenant, ("deployment", "dep-a"), daily, today, "0.0001", "0"),
        (tenant, ("user", "u-2"), monthly, month, "8", "0"),  # no policy
        (other, ("agent", "bot"), daily, today, "1", "0"),
    ]:
        await insert_held(
            pool, owner, scope, window=window, start=start, placed=placed, ended=ended
        )

    async with pool.acquire() as connection:
        statuses = await tenant_budget_status(connection, tenant, now=now)
    fields = ("scope_type", "scope_id", "window", "period_start", "spend_usd", "limit_usd")
    more = ("percent", "level", "held_usd", "enforcement")
    day = "2026-03-01"
    assert [s.to_json() for s in statuses] == [
        dict(zip((*fields, *more), values, strict=True))
        for values in [
            ("tenant", tenant, "daily", day, "80", "100", "80.00", "warning", "10.25", "alert"),
            ("tenant", tenant, "monthly", day, "1000", "1000", "100.00", "exceeded", "0", "alert"),
            ("deployment", "dep-a", "daily", day, "2.4999", "5", "50.00", "ok", "0.0001", "block"),
            ("user", "u-1", "monthly", day, "159.999", "200", "80.00", "ok", "0", "alert"),
            ("agent", "bot", "daily", day, "0", "3", "0.00", "ok", "0", "alert"),
        ]
    ]
    assert statuses[0].level is BudgetLevel.WARNING
    # One microsecond earlier it is still February: the February counters are the current ones.
    async with pool.acquire() as connection:
        earlier = await tenant_budget_status(
            connection, tenant, now=datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC)
        )
    assert [
        (s.window, str(s.period_start), s.spend_usd, s.level, s.held_usd) for s in earlier[:2]
    ] == [
        (BudgetWindow.DAILY, "2026-02-28", D("99"), BudgetLevel.WARNING, D(0)),
        (BudgetWindow.MONTHLY, "2026-02-01", D("9999"), BudgetLevel.EXCEEDED, D(40)),
    ]


async def test_budget_status_command_prints_a_table_or_json_lines(
    pool: asyncpg.Pool, database_url: str
) -> None:
    tenant = unique("t-cli-status")
    async with pool.acquire() as connection:
        await set_policy(
            connection,
            BudgetPolicy(tenant, ScopeType.DEPLOYMENT, "dep-7", D("10"), D("100"), 80, BLOCK),
            actor="test",
        )
    await clock.clear_of_midnight()  # the command reads today's and this month's counters
    now = clock.now()
    day, month = period_start(BudgetWindow.DAILY, now), period_start(BudgetWindow.MONTHLY, now)
    dep = ("deployment", "dep-7")
    # Exactly 80% of the daily limit, exactly the monthly limit.
    await insert_spend(pool, tenant, dep, window=BudgetWindow.DAILY, start=day, spend="8.000")
    await insert_spend(pool, tenant, dep, window=BudgetWindow.MONTHLY, start=month, spend="100")
    await insert_held(
        pool, tenant, dep, window=BudgetWindow.DAILY, start=day, placed="1.50", ended="0.25"
    )

    as_json = await llm_usage(database_url, "budget", "status", "--tenant", tenant, "--json")
    assert as_json.code == 0, as_json
    common = {"scope_type": "deployment", "scope_id": "dep-7"}
    assert [json.loads(line) for line in as_json.out.splitlines()] == [
        {
            **common,
            "window": "daily",
            "period_start": day.isoformat(),
            "spend_usd": "8",
            "limit_usd": "10",
            "percent": "80.00",
            "level": "warning",
            "held_usd": "1.25",
            "enforcement": "block",
        },
        {
            **common,
            "window": "monthly",
            "period_start": month.isoformat(),
            "spend_usd": "100",
            "limit_usd": "100",
            "percent": "100.00",
            "level": "exceeded",
            "held_usd": "0",
            "enforcement": "block",
        },
    ]

    table = await llm_usage(database_url, "budget", "status", "--tenant", tenant)
    assert table.code == 0, table
    assert table.out.splitlines() == [
        "SCOPE_TYPE  SCOPE_ID  WINDOW   PERIOD_START  SPEND_USD  HELD_USD  LIMIT_USD  PERCENT  "
        "LEVEL     ENFORCEMENT",
        f"deployment  dep-7     daily    {day}            8      1.25         10    80.00  "
        "warning   block",
        f"deployment  dep-7     monthly  {month}          100         0        100   100.00  "
        "exceeded  block",
    ]
    empty = await llm_usage(database_url, "budget", "status", "--tenant", unique("t-none"))
    assert empty.code == 0, empty
    assert "has no budget policies" in empty.out


_SET = ("policy", "set", "--tenant", "t-args", "--scope")
_DAILY = "--daily-limit-usd"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((*_SET, "tenant", _DAILY, "-1"), "--daily-limit-usd must be more than 0"),
        ((*_SET, "tenant", _DAILY, "0"), "--daily-limit-usd must be more than 0"),
        ((*_SET, "tenant", _DAILY, "1O0"), "--daily-limit-usd must be a number"),
        ((*_SET, "tenant", _DAILY, "1", "--warn-pct", "0"), "--warn-pct must be from 1 to 99"),
        ((*_SET, "tenant", _DAILY, "1", "--warn-pct", "100"), "--warn-pct must be from 1 to 99"),
        ((*_SET, "tenant"), "needs a daily limit, a monthly limit or both"),
        ((*_SET, "org", _DAILY, "1"), "--scope must be one of tenant, deployment, user, agent"),
        ((*_SET, "agent", _DAILY, "1"), "--scope-id is required when the scope is agent"),
        ((*_SET, "tenant", "--monthly-limit-usd", "1.0000000000000000001"), "18 digits after"),
        ((*_SET, "tenant", _DAILY, "1", "--enforcement", "deny"), "--enforcement must be one of"),
        (("policy", "delete", "--tenant", "t-args", "--scope", "user"), "--scope-id is required"),
    ],
)
async def test_each_bad_argument_is_one_line_and_exit_2(
    database_url: str, pool: asyncpg.Pool, args: tuple[str, ...], fragment: str
) -> None:
    finished = await llm_usage(database_url, *args)
    assert finished.code == 2, finished
    assert finished.err.count("\n") == 1, finished
    assert re.fullmatch(r"llm-usage: error: .+\n", finished.err), finished
    assert fragment in finished.err, finished
    assert "Traceback" not in finished.err
    assert finished.out == ""
    async with pool.acquire() as connection:
        assert await tenant_policies(connection, "t-args") == []


@pytest.mark.parametrize(
    "args",
    [
        ("policy", "set", "--tenant", "t1", "--scope", "tenant", "--daily-limit-usd", "5"),
        ("policy", "list", "--tenant", "t1"),
        ("policy", "history", "--tenant", "t1"),
        ("policy", "delete", "--tenant", "t1", "--scope", "tenant"),
        ("budget", "status", "--tenant", "t1"),
    ],
)
async def test_an_unmigrated_database_is_one_line_naming_migrate(
    empty_database_url: str, args: tuple[str, ...]
) -> None:
    finished = await llm_usage(empty_database_url, *args)
    assert finished.code == 2, finished
    assert finished.err == (
        "llm-usage: error: the database has no budget tables yet; run `llm-usage migrate` first\n"
    )
