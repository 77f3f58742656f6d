"""Budget policies in `budget_policies`, and every change of one in `budget_policy_audit`.

A change (set or delete) is one transaction: the policy row is locked, changed, audited with
its old and new value, and `NOTIFY budget_policies, '<tenant_id>'` is sent, which PostgreSQL
delivers only when that transaction commits. Changes of one scope are serialised by the row
lock, so the audit reads as a chain: each entry's old policy is the previous entry's new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from llm_usage.domain.budgets import Enforcement, ScopeType
from llm_usage.domain.policies import BudgetPolicy, InvalidPolicyError, PolicyKey
from llm_usage.storage.pool import Connection

# LISTEN on this channel to hear of every committed change; the payload is the tenant id.
NOTIFY_CHANNEL: Final = "budget_policies"
MAX_ACTOR_LENGTH: Final = 200

_COLUMNS = (
    "tenant_id, scope_type, scope_id, daily_limit_usd, monthly_limit_usd, warn_threshold_pct, "
    "enforcement"
)
_KEY_MATCHES = "tenant_id = $1 AND scope_type = $2 AND scope_id = $3"

_SELECT_FOR_UPDATE = f"SELECT {_COLUMNS} FROM budget_policies WHERE {_KEY_MATCHES} FOR UPDATE"
# ON CONFLICT DO NOTHING waits for a concurrent transaction inserting the same key and then
# does nothing once it commits: the caller goes back to locking the row that one created.
_INSERT_IF_ABSENT = f"""
    INSERT INTO budget_policies ({_COLUMNS}, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp())
    ON CONFLICT (tenant_id, scope_type, scope_id) DO NOTHING
    RETURNING true
"""
# The time is the database's clock_timestamp() read under the row lock ($8): Citus refuses a
# volatile function in an UPDATE of a distributed table ("functions used in UPDATE queries on
# distributed tables must not be VOLATILE").
_UPDATE = f"""
    UPDATE budget_policies
    SET daily_limit_usd = $4, monthly_limit_usd = $5, warn_threshold_pct = $6, enforcement = $7,
        updated_at = $8
    WHERE {_KEY_MATCHES}
"""
_DELETE = f"DELETE FROM budget_policies WHERE {_KEY_MATCHES} RETURNING {_COLUMNS}"
# clock_timestamp(), not now(): taken while the row lock is held, so a later change of the
# scope never has an earlier time than the one before it.
_AUDIT = """
    INSERT INTO budget_policy_audit
        (tenant_id, scope_type, scope_id, changed_at, actor, old_policy, new_policy)
    VALUES ($1, $2, $3, clock_timestamp(), $4, $5::jsonb, $6::jsonb)
"""
_NOTIFY = "SELECT pg_notify($1, $2)"

# Scopes in the contract's order (tenant, deployment, user, agent), then by id.
_ORDER = (
    "ORDER BY tenant_id, array_position(ARRAY['tenant', 'deployment', 'user', 'agent'], "
    "scope_type), scope_id"
)
_SELECT_TENANT = f"SELECT {_COLUMNS} FROM budget_policies WHERE tenant_id = $1 {_ORDER}"
_SELECT_HISTORY = """
    SELECT id, changed_at, actor, tenant_id, scope_type, scope_id, old_policy, new_policy
    FROM budget_policy_audit
    WHERE tenant_id = $1
    ORDER BY id
"""

# Each round of the set loop ends with the row locked, unless another transaction deleted the
# row between our insert attempt and our lock; that cannot go on, but a bound keeps it honest.
_MAX_SET_ROUNDS = 100


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """What `set_policy` or `delete_policy` did: the policy before and after (None: none), and
    whether it changed anything (a change is audited and notified; no change is neither)."""

    old: BudgetPolicy | None
    new: BudgetPolicy | None

    @property
    def changed(self) -> bool:
        return self.old != self.new


@dataclass(frozen=True, slots=True)
class PolicyAuditEntry:
    """One row of the audit: when, who, and the policy before and after as stored JSON."""

    id: int
    changed_at: datetime
    actor: str
    tenant_id: str
    scope_type: ScopeType
    scope_id: str
    old_policy: Mapping[str, Any] | None
    new_policy: Mapping[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "changed_at": self.changed_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "actor": self.actor,
            "tenant_id": self.tenant_id,
            "scope_type": self.scope_type.value,
            "scope_id": self.scope_id,
            "old_policy": self.old_policy,
            "new_policy": self.new_policy,
        }


def _policy_from_row(row: asyncpg.Record) -> BudgetPolicy:
    return BudgetPolicy(
        tenant_id=row["tenant_id"],
        scope_type=ScopeType(row["scope_type"]),
        scope_id=row["scope_id"],
        daily_limit_usd=row["daily_limit_usd"],
        monthly_limit_usd=row["monthly_limit_usd"],
        warn_threshold_pct=row["warn_threshold_pct"],
        enforcement=Enforcement(row["enforcement"]),
    )


def _policy_json(policy: BudgetPolicy | None) -> str | None:
    return None if policy is None else json.dumps(policy.to_json())


def check_actor(actor: str) -> str:
    """Who changes a policy, as the audit records it: 1 to 200 characters, no NUL."""
    if not 1 <= len(actor) <= MAX_ACTOR_LENGTH or "\x00" in actor:
        raise InvalidPolicyError(
            "actor", f"must be 1 to {MAX_ACTOR_LENGTH} characters without NUL, not {actor!r}"
        )
    return actor


async def _audit_and_notify(
    connection: Connection,
    key: PolicyKey,
    *,
    actor: str,
    old: BudgetPolicy | None,
    new: BudgetPolicy | None,
) -> None:
    await connection.execute(_AUDIT, *key, actor, _policy_json(old), _policy_json(new))
    await connection.execute(_NOTIFY, NOTIFY_CHANNEL, key[0])


async def set_policy(connection: Connection, policy: BudgetPolicy, *, actor: str) -> PolicyChange:
    """Create or replace the whole policy of `policy`'s scope, audited and notified in the same
    transaction (a savepoint when the caller already has one open).

    A policy equal to the current one changes nothing: no audit row, no notification.
    Needs READ COMMITTED (PostgreSQL's default), where each statement sees what committed before it.
    """
    check_actor(actor)
    values = (
        *policy.key,
        policy.daily_limit_usd,
        policy.monthly_limit_usd,
        policy.warn_threshold_pct,
        policy.enforcement.value,
    )
    async with connection.transaction():
        for _ in range(_MAX_SET_ROUNDS):
            row = await connection.fetchrow(_SELECT_FOR_UPDATE, *policy.key)
            if row is not None:
                old: BudgetPolicy | None = _policy_from_row(row)
                if old == policy:
                    return PolicyChange(old=old, new=old)
                locked_at = await connection.fetchval("SELECT clock_timestamp()")
                await connection.execute(_UPDATE, *values, locked_at)
                break
            if await connection.fetchval(_INSERT_IF_ABSENT, *values):
                old = None
                break
        else:  # pragma: no cover - needs a scope created and deleted 100 times meanwhile
            raise RuntimeError(f"could not lock the policy {policy.key} to change it")
        await _audit_and_notify(connection, policy.key, actor=actor, old=old, new=policy)
    return PolicyChange(old=old, new=policy)


async def delete_policy(
    connection: Connection,
    *,
    tenant_id: str,
    scope_type: ScopeType,
    scope_id: str,
    actor: str,
) -> PolicyChange:
    """Delete a scope's policy, audited and notified in the same transaction. Deleting a policy
    that does not exist changes nothing (`old` is None): no audit row, no notification."""
    check_actor(actor)
    key: PolicyKey = (tenant_id, ScopeType(scope_type).value, scope_id)
    async with connection.transaction():
        row = await connection.fetchrow(_DELETE, *key)
        if row is None:
            return PolicyChange(old=None, new=None)
        old = _policy_from_row(row)
        await _audit_and_notify(connection, key, actor=actor, old=old, new=None)
    return PolicyChange(old=old, new=None)


async def tenant_policies(connection: Connection, tenant_id: str) -> list[BudgetPolicy]:
    """The tenant's policies: scopes in the order tenant, deployment, user, agent, then by id."""
    return [_policy_from_row(row) for row in await connection.fetch(_SELECT_TENANT, tenant_id)]


def _json_or_none(value: str | None) -> Mapping[str, Any] | None:
    if value is None:
        return None
    loaded: Mapping[str, Any] = json.loads(value)
    return loaded


async def policy_history(connection: Connection, tenant_id: str) -> list[PolicyAuditEntry]:
    """The audit of the tenant's policy changes, oldest first."""
    rows = await connection.fetch(_SELECT_HISTORY, tenant_id)
    return [
        PolicyAuditEntry(
            id=row["id"],
            changed_at=row["changed_at"],
            actor=row["actor"],
            tenant_id=row["tenant_id"],
            scope_type=ScopeType(row["scope_type"]),
            scope_id=row["scope_id"],
            old_policy=_json_or_none(row["old_policy"]),
            new_policy=_json_or_none(row["new_policy"]),
        )
        for row in rows
    ]
