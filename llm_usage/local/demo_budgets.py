"""The demo's budgets: policies its stream will cross, and the alerts as they reach the topic."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import ROUND_DOWN, Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer

from llm_usage.core.errors import LocalServiceError
from llm_usage.core.settings import Settings
from llm_usage.domain.budgets import ScopeType
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.kafka.clients import client_options, start_client
from llm_usage.storage.budget_policies import set_policy
from llm_usage.storage.pool import create_pool

# A limit this share of what the stream spends on its scope: the stream crosses 80 % and 100 %.
LIMIT_SHARE = Decimal("0.9")
DEMO_ACTOR = "llm-usage demo"
# How long to wait for the alerts still on their way once both consumers have stopped.
ALERT_GRACE_SECONDS = 10.0
ASSIGNMENT_SECONDS = 30.0


def _limit_below(spend: Decimal) -> Decimal:
    """A round limit that `spend` exceeds: LIMIT_SHARE of it, in whole cents when it has any."""
    share = spend * LIMIT_SHARE
    cents = share.quantize(Decimal("0.01"), ROUND_DOWN)
    return cents if cents > 0 else share


def demo_policies(
    events: Iterable[Mapping[str, Any]], *, monthly_tenant: str, daily_tenant: str
) -> list[BudgetPolicy]:
    """A monthly limit on `monthly_tenant` and a daily limit on the user of `daily_tenant` who
    spends most, each below what the stream spends there (all events of one UTC day)."""
    tenant_spend = Decimal(0)
    user_spend: dict[str, Decimal] = defaultdict(Decimal)
    for event in events:
        charge = Decimal(event["customer_charge_usd"])
        if event["tenant_id"] == monthly_tenant:
            tenant_spend += charge
        if event["tenant_id"] == daily_tenant and event["user_id"] is not None:
            user_spend[event["user_id"]] += charge
    top_user = max(sorted(user_spend), key=lambda user: user_spend[user])
    return [
        BudgetPolicy(
            tenant_id=monthly_tenant,
            scope_type=ScopeType.TENANT,
            scope_id=monthly_tenant,
            monthly_limit_usd=_limit_below(tenant_spend),
        ),
        BudgetPolicy(
            tenant_id=daily_tenant,
            scope_type=ScopeType.USER,
            scope_id=top_user,
            daily_limit_usd=_limit_below(user_spend[top_user]),
        ),
    ]


async def set_demo_policies(settings: Settings, policies: list[BudgetPolicy]) -> None:
    """Set each policy as `llm-usage policy set` does, and say so."""
    pool = await create_pool(settings.database_url, size=1)
    try:
        async with pool.acquire() as connection:
            for policy in policies:
                await set_policy(connection, policy, actor=DEMO_ACTOR)
    finally:
        await pool.close()
    for policy in policies:
        window, limit = (
            ("monthly", policy.monthly_limit_usd)
            if policy.monthly_limit_usd is not None
            else ("daily", policy.daily_limit_usd)
        )
        assert limit is not None
        print(
            f"  {policy.tenant_id}: {window} limit {canonical_decimal(limit)} USD on "
            f"{policy.scope_type.value} {policy.scope_id} "
            f"(warning at {policy.warn_threshold_pct} %)"
        )


def alert_line(alert: Mapping[str, Any]) -> str:
    """One alert as the demo prints it."""
    return (
        f"  alert  {alert['level']:<8}  {alert['tenant_id']}  "
        f"{alert['scope_type']} {alert['scope_id']}  "
        f"{alert['window']} from {alert['period_start']}  at {alert['threshold_pct']} %: "
        f"spend {alert['spend_usd']} / limit {alert['limit_usd']} USD"
    )


class AlertWatch:
    """Reads the alerts topic from where it ended when the watch began, outside any group,
    and prints the alerts of the demo's tenants as they arrive."""

    def __init__(self, settings: Settings, tenants: set[str]) -> None:
        self._settings = settings
        self._tenants = tenants
        # Subscribed outside any group: it is given every partition of the topic.
        self._reader = AIOKafkaConsumer(
            settings.alerts_topic,
            **client_options(settings),
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        self.alerts: list[dict[str, Any]] = []

    async def start(self) -> None:
        """Start reading at the topic's current end (before the demo publishes anything)."""
        await start_client(self._reader, self._settings)
        deadline = time.monotonic() + ASSIGNMENT_SECONDS
        while not self._reader.assignment():
            if time.monotonic() > deadline:
                raise LocalServiceError(
                    f"Kafka gave no partitions of {self._settings.alerts_topic} within "
                    f"{ASSIGNMENT_SECONDS:.0f} s; is the topic there (`llm-usage topics`)?"
                )
            await self._reader.getmany(timeout_ms=100)
        await self._reader.seek_to_end()
        for partition in self._reader.assignment():
            await self._reader.position(partition)  # fixes the start now, not at the first fetch

    async def run(self, *, expected: int, consumers_done: asyncio.Event) -> None:
        """Print alerts until `expected` have come, or ALERT_GRACE_SECONDS after the consumers
        stopped; then stop reading."""
        deadline: float | None = None
        try:
            while len(self.alerts) < expected:
                if consumers_done.is_set():
                    deadline = deadline or time.monotonic() + ALERT_GRACE_SECONDS
                    if time.monotonic() > deadline:
                        break
                for batch in (await self._reader.getmany(timeout_ms=200)).values():
                    for record in batch:
                        self._take(record.value)
        finally:
            await self._reader.stop()

    def _take(self, value: bytes | None) -> None:
        try:
            alert = json.loads(value or b"")
        except ValueError:
            return
        if isinstance(alert, dict) and alert.get("tenant_id") in self._tenants:
            self.alerts.append(alert)
            print(alert_line(alert), flush=True)
