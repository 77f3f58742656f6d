"""The notification team's example in docs/ prints each alert on the topic once, amounts exact."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from llm_usage.core.settings import Settings
from llm_usage.domain.budgets import AlertLevel, BudgetWindow, ScopeType, alert_id_for
from llm_usage.kafka.topics import ensure_topics
from llm_usage.schemas.budget_alert import BudgetAlert
from tests import clock
from tests.integration.pipeline import produce, unique

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "consume_budget_alerts.py"
NEW_ALERT = re.compile(r"^new alert (\S+): ", re.MULTILINE)


def budget_alert(
    *,
    tenant_id: str,
    scope_type: ScopeType,
    scope_id: str,
    window: BudgetWindow,
    period_start: date,
    level: AlertLevel,
    spend_usd: str,
    limit_usd: str,
    threshold_pct: int,
    triggered_by: str | None,
) -> BudgetAlert:
    return BudgetAlert(
        alert_id=alert_id_for(
            tenant_id=tenant_id,
            scope_type=scope_type,
            scope_id=scope_id,
            window=window,
            period_start=period_start,
            level=level,
            limit_usd=Decimal(limit_usd),
        ),
        tenant_id=tenant_id,
        scope_type=scope_type,
        scope_id=scope_id,
        window=window,
        period_start=period_start,
        level=level,
        spend_usd=Decimal(spend_usd),
        limit_usd=Decimal(limit_usd),
        threshold_pct=threshold_pct,
        triggered_by=triggered_by,
        emitted_at=clock.now(),
    )


def printed_line(alert: BudgetAlert) -> str:
    """The line the example prints for `alert`, with the amounts exactly as on the topic."""
    sent = json.loads(alert.encode())
    cause = f"triggered by {sent['triggered_by']}" if sent["triggered_by"] else "policy change"
    return (
        f"new alert {sent['alert_id']}: {sent['tenant_id']} {sent['scope_type']}/"
        f"{sent['scope_id']} {sent['window']} {sent['period_start']} {sent['level']}: "
        f"spend {sent['spend_usd']} of limit {sent['limit_usd']} "
        f"(threshold {sent['threshold_pct']}%), {cause}"
    )


TODAY = clock.today()
THIS_MONTH = TODAY.replace(day=1)
ACME_WARNING = budget_alert(
    tenant_id="acme",
    scope_type=ScopeType.DEPLOYMENT,
    scope_id="support-bot",
    window=BudgetWindow.MONTHLY,
    period_start=THIS_MONTH,
    level=AlertLevel.WARNING,
    spend_usd="98765432.109876543219",  # 20 significant digits: a float would lose some
    limit_usd="100000000",
    threshold_pct=80,
    triggered_by="req-1",
)
ACME_EXCEEDED = budget_alert(
    tenant_id="acme",
    scope_type=ScopeType.DEPLOYMENT,
    scope_id="support-bot",
    window=BudgetWindow.MONTHLY,
    period_start=THIS_MONTH,
    level=AlertLevel.EXCEEDED,
    spend_usd="100000000.000000000001",
    limit_usd="100000000",
    threshold_pct=100,
    triggered_by="req-2",
)
# The limit was raised: the same scope and period alert again, under a new alert_id.
ACME_REARMED = budget_alert(
    tenant_id="acme",
    scope_type=ScopeType.DEPLOYMENT,
    scope_id="support-bot",
    window=BudgetWindow.MONTHLY,
    period_start=THIS_MONTH,
    level=AlertLevel.WARNING,
    spend_usd="160000000.5",
    limit_usd="200000000.00",
    threshold_pct=80,
    triggered_by="req-3",
)
# A policy lowered below the day's spend: no event crossed it.
GLOBEX_POLICY_CHANGE = budget_alert(
    tenant_id="globex",
    scope_type=ScopeType.TENANT,
    scope_id="globex",
    window=BudgetWindow.DAILY,
    period_start=TODAY,
    level=AlertLevel.EXCEEDED,
    spend_usd="0.000000000000000003",
    limit_usd="0.000000000000000001",
    threshold_pct=100,
    triggered_by=None,
)
ALERTS = [ACME_WARNING, ACME_EXCEEDED, ACME_REARMED, GLOBEX_POLICY_CHANGE]


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def printed_ids(self) -> list[str]:
        return NEW_ALERT.findall(self.stdout)


async def publish_alerts(bootstrap_servers: str) -> str:
    """A fresh 3-partition alerts topic holding ALERTS and then a second copy of the first."""
    topic = unique("it-alerts")
    await ensure_topics(
        Settings(kafka_bootstrap_servers=bootstrap_servers),
        [topic],
        partitions=3,
        replication_factor=1,
    )
    records = [(alert.tenant_id.encode(), alert.encode()) for alert in ALERTS]
    await produce(bootstrap_servers, topic, [*records, records[0]])
    return topic


async def run_example(
    bootstrap_servers: str, topic: str, *, group: str, handled_db: Path, args: list[str]
) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--bootstrap-servers",
        bootstrap_servers,
        "--topic",
        topic,
        "--group",
        group,
        "--handled-db",
        str(handled_db),
        *args,
        cwd=handled_db.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def alerts_topic(kafka_bootstrap_servers: str) -> str:
    return await publish_alerts(kafka_bootstrap_servers)


async def test_the_example_prints_each_alert_once_with_exact_amounts(
    kafka_bootstrap_servers: str, alerts_topic: str, tmp_path: Path
) -> None:
    run = await run_example(
        kafka_bootstrap_servers,
        alerts_topic,
        group=unique("notifications"),
        handled_db=tmp_path / "handled.sqlite3",
        args=["--exit-when-idle", "2"],
    )
    assert run.returncode == 0, run.stderr
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("new alert "))
    assert lines == sorted(printed_line(alert) for alert in ALERTS), run.stdout
    # Exact amounts, as sent: not rounded, not in exponent form, no trailing zeros.
    assert "spend 98765432.109876543219 of limit 100000000 " in run.stdout
    assert "spend 0.000000000000000003 of limit 0.000000000000000001 " in run.stdout
    assert "of limit 200000000 " in run.stdout
    # The second copy of the first alert was read and skipped.
    assert f"already handled {ACME_WARNING.alert_id}, skipped" in run.stderr
    # A tenant's alerts share a partition and arrive in order: warning before exceeded.
    ids = run.printed_ids
    assert ids.index(ACME_WARNING.alert_id) < ids.index(ACME_EXCEEDED.alert_id)
    assert ids.index(ACME_EXCEEDED.alert_id) < ids.index(ACME_REARMED.alert_id)


async def test_a_restart_prints_only_the_alerts_not_yet_handled(
    kafka_bootstrap_servers: str, alerts_topic: str, tmp_path: Path
) -> None:
    group = unique("notifications")
    handled_db = tmp_path / "handled.sqlite3"
    first = await run_example(
        kafka_bootstrap_servers,
        alerts_topic,
        group=group,
        handled_db=handled_db,
        args=["--max-alerts", "2"],
    )
    assert first.returncode == 0, first.stderr
    assert len(first.printed_ids) == 2, first.stdout

    second = await run_example(
        kafka_bootstrap_servers,
        alerts_topic,
        group=group,
        handled_db=handled_db,
        args=["--exit-when-idle", "2"],
    )
    assert second.returncode == 0, second.stderr
    printed = first.printed_ids + second.printed_ids
    assert sorted(printed) == sorted(alert.alert_id for alert in ALERTS), (first, second)
    # The first run committed what it handled: the second starts after it, and meets again at
    # most the second copy of the first alert.
    skipped = re.findall(r"already handled (\S+), skipped", second.stderr)
    assert skipped in ([], [ACME_WARNING.alert_id]), second.stderr


async def test_a_replay_from_the_start_prints_nothing_already_handled(
    kafka_bootstrap_servers: str, alerts_topic: str, tmp_path: Path
) -> None:
    handled_db = tmp_path / "handled.sqlite3"
    first = await run_example(
        kafka_bootstrap_servers,
        alerts_topic,
        group=unique("notifications"),
        handled_db=handled_db,
        args=["--exit-when-idle", "2"],
    )
    assert sorted(first.printed_ids) == sorted(alert.alert_id for alert in ALERTS), first
    # A new group reads the topic from its first record: the same store skips every one.
    replay = await run_example(
        kafka_bootstrap_servers,
        alerts_topic,
        group=unique("notifications-replay"),
        handled_db=handled_db,
        args=["--exit-when-idle", "2"],
    )
    assert replay.returncode == 0, replay.stderr
    assert replay.printed_ids == [], replay.stdout
    assert replay.stderr.count("already handled ") == len(ALERTS) + 1, replay.stderr
