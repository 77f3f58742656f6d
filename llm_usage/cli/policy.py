"""`llm-usage policy set|list|delete|history`: a tenant's budget policies and their audit.

Arguments are checked before the database is touched; a bad one, a database that cannot be
reached or is not migrated, and deleting a policy that does not exist each end in one line and
exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO

from llm_usage.cli.args import Commands, OneLineArgumentParser, checked_tenant
from llm_usage.cli.budget_tables import aligned_table, budget_tables
from llm_usage.core.errors import ConfigurationError, UserFacingError
from llm_usage.domain.budgets import Enforcement, ScopeType
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.policies import (
    BudgetPolicy,
    InvalidPolicyError,
    parse_scope_type,
    policy_from_text,
    scope_id_for,
)

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


# Every scope type and enforcement, for help texts.
SCOPE_CHOICES = "|".join(scope.value for scope in ScopeType)
ENFORCEMENT_CHOICES = "|".join(each.value for each in Enforcement)

# The command-line spelling of each policy field, for error messages.
_FLAGS = {
    "tenant_id": "--tenant",
    "scope_type": "--scope",
    "scope_id": "--scope-id",
    "daily_limit_usd": "--daily-limit-usd",
    "monthly_limit_usd": "--monthly-limit-usd",
    "warn_threshold_pct": "--warn-pct",
    "enforcement": "--enforcement",
    "actor": "--actor",
}


def _argument_error(error: InvalidPolicyError) -> ConfigurationError:
    if error.field is None:
        return ConfigurationError(
            f"{error.problem}: give --daily-limit-usd, --monthly-limit-usd or both "
            "(`llm-usage policy delete` removes a policy)"
        )
    return ConfigurationError(f"{_FLAGS.get(error.field, error.field)} {error.problem}")


def default_actor() -> str:
    """Who is changing a policy when `--actor` is not given: the OS user, else "unknown"."""
    try:
        return getpass.getuser() or "unknown"
    except (OSError, KeyError, ImportError):  # no user name in the environment or passwd
        return "unknown"


def _amount(value: Decimal | None) -> str:
    return "-" if value is None else canonical_decimal(value)


def _scope(policy: BudgetPolicy) -> str:
    return f"{policy.scope_type.value} {policy.scope_id!r} of tenant {policy.tenant_id!r}"


def _limit(value: Decimal | None) -> str:
    return "-" if value is None else f"{canonical_decimal(value)} USD"


def describe_policy(policy: BudgetPolicy) -> str:
    """`daily 100 USD, monthly -, warning at 80%` (`-`: no limit for that window), and
    `, blocking checks` when the limits also deny budget checks."""
    blocking = ", blocking checks" if policy.enforcement is Enforcement.BLOCK else ""
    return (
        f"daily {_limit(policy.daily_limit_usd)}, monthly {_limit(policy.monthly_limit_usd)}, "
        f"warning at {policy.warn_threshold_pct}%{blocking}"
    )


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def policy_set(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.budget_policies import check_actor, set_policy  # noqa: PLC0415

    try:
        policy = policy_from_text(
            tenant_id=args.tenant,
            scope_type=args.scope,
            scope_id=args.scope_id,
            daily_limit_usd=args.daily_limit_usd,
            monthly_limit_usd=args.monthly_limit_usd,
            warn_threshold_pct=args.warn_pct,
            enforcement=args.enforcement,
        )
        actor = check_actor(default_actor() if args.actor is None else args.actor)
    except InvalidPolicyError as error:
        raise _argument_error(error) from None
    async with budget_tables(settings) as connection:
        change = await set_policy(connection, policy, actor=actor)
    if not change.changed:
        print(f"unchanged {_scope(policy)}: {describe_policy(policy)} (nothing audited)", file=out)
    elif change.old is None:
        print(f"created {_scope(policy)}: {describe_policy(policy)}", file=out)
    else:
        print(
            f"replaced {_scope(policy)}: {describe_policy(policy)} "
            f"(was: {describe_policy(change.old)})",
            file=out,
        )


async def policy_delete(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.budget_policies import check_actor, delete_policy  # noqa: PLC0415

    tenant_id = checked_tenant(args.tenant)
    try:
        scope_type = parse_scope_type(args.scope)
        scope_id = scope_id_for(tenant_id, scope_type, args.scope_id)
        actor = check_actor(default_actor() if args.actor is None else args.actor)
    except InvalidPolicyError as error:
        raise _argument_error(error) from None
    async with budget_tables(settings) as connection:
        change = await delete_policy(
            connection, tenant_id=tenant_id, scope_type=scope_type, scope_id=scope_id, actor=actor
        )
    if change.old is None:
        raise UserFacingError(
            f"tenant {tenant_id!r} has no {scope_type.value} policy for {scope_id!r}; nothing "
            f"deleted (`llm-usage policy list --tenant {tenant_id}` shows its policies)"
        )
    print(f"deleted {_scope(change.old)} (was: {describe_policy(change.old)})", file=out)


async def policy_list(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.budget_policies import tenant_policies  # noqa: PLC0415

    tenant_id = checked_tenant(args.tenant)
    async with budget_tables(settings) as connection:
        policies = await tenant_policies(connection, tenant_id)
    if args.json:
        for policy in policies:
            print(json.dumps(policy.to_json()), file=out)
    elif not policies:
        print(f"tenant {tenant_id!r} has no budget policies", file=out)
    else:
        rows = [
            [
                policy.scope_type.value,
                policy.scope_id,
                _amount(policy.daily_limit_usd),
                _amount(policy.monthly_limit_usd),
                str(policy.warn_threshold_pct),
                policy.enforcement.value,
            ]
            for policy in policies
        ]
        headers = [
            "SCOPE_TYPE",
            "SCOPE_ID",
            "DAILY_LIMIT_USD",
            "MONTHLY_LIMIT_USD",
            "WARN_PCT",
            "ENFORCEMENT",
        ]
        print(aligned_table(headers, rows, right={2, 3, 4}), file=out)


def _describe_audited(policy: Mapping[str, Any] | None) -> str:
    if policy is None:
        return "-"
    try:
        return describe_policy(BudgetPolicy.from_json(policy))
    except (InvalidPolicyError, KeyError, TypeError):  # an older or foreign shape: as stored
        return json.dumps(policy)


async def policy_history(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.budget_policies import policy_history  # noqa: PLC0415

    tenant_id = checked_tenant(args.tenant)
    async with budget_tables(settings) as connection:
        entries = await policy_history(connection, tenant_id)
    if args.json:
        for entry in entries:
            print(json.dumps(entry.to_json()), file=out)
    elif not entries:
        print(f"tenant {tenant_id!r} has no policy changes", file=out)
    else:
        rows = [
            [
                _utc(entry.changed_at),
                entry.actor,
                f"{entry.scope_type.value} {entry.scope_id}",
                _describe_audited(entry.old_policy),
                _describe_audited(entry.new_policy),
            ]
            for entry in entries
        ]
        print(
            aligned_table(["CHANGED_AT", "ACTOR", "SCOPE", "OLD", "NEW"], rows, right=set()),
            file=out,
        )


async def run_policy_command(args: argparse.Namespace, settings: Settings) -> None:
    """`llm-usage policy <action>`, printing to stdout."""
    action = {
        "set": policy_set,
        "delete": policy_delete,
        "list": policy_list,
        "history": policy_history,
    }[args.policy_command]
    await action(settings, args, sys.stdout)


def add_parser(commands: Commands) -> None:
    """`policy set|list|delete|history`: every mistake in their arguments is one line and exit 2."""
    policy = commands.add_parser("policy", help="budget policies: set, list, delete, history")
    policy.set_defaults(run=run_policy_command)
    policy_commands = policy.add_subparsers(
        dest="policy_command",
        required=True,
        metavar="ACTION",
        parser_class=OneLineArgumentParser,
    )
    policy_set = policy_commands.add_parser(
        "set", help="create or replace a scope's whole policy (a limit left out is removed)"
    )
    policy_delete = policy_commands.add_parser("delete", help="delete a scope's policy")
    for scoped in (policy_set, policy_delete):
        scoped.add_argument("--tenant", required=True, metavar="ID")
        scoped.add_argument("--scope", required=True, metavar=SCOPE_CHOICES)
        scoped.add_argument(
            "--scope-id",
            metavar="ID",
            help="required unless --scope tenant, whose scope id is the tenant id",
        )
    policy_set.add_argument("--daily-limit-usd", metavar="X", help="exact USD, more than 0")
    policy_set.add_argument("--monthly-limit-usd", metavar="Y", help="exact USD, more than 0")
    policy_set.add_argument("--warn-pct", metavar="N", help="warn at N%% of a limit (1-99) [80]")
    policy_set.add_argument(
        "--enforcement",
        metavar=ENFORCEMENT_CHOICES,
        help="alert: the limits only alert; block: budget checks that would pass one are also "
        "denied [alert]",
    )
    for scoped in (policy_set, policy_delete):
        scoped.add_argument(
            "--actor", metavar="NAME", help="who, for the audit [the OS user, else unknown]"
        )
    for name, text in (("list", "the tenant's policies"), ("history", "the audit, oldest first")):
        listing = policy_commands.add_parser(name, help=text)
        listing.add_argument("--tenant", required=True, metavar="ID")
        listing.add_argument("--json", action="store_true", help="one JSON object a line")
