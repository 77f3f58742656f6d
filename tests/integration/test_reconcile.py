"""Reconcile against a database the real consumers filled (their handlers, in process) and a real
alerts topic: no drift on what they wrote, then each drift injected straight into the database or
the topic, each on a tenant of its own, named exactly with its exact difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from llm_usage.consumers.budget.handler import BudgetCounter
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.core.settings import Settings
from llm_usage.domain.periods import period_of
from llm_usage.domain.reconcile import Drift
from llm_usage.kafka.topics import ensure_topics
from llm_usage.rollup.reconcile import reconcile
from llm_usage.rollup.run import close_month
from tests import clock
from tests.integration.pipeline import encode, produce, unique, usage_event
from tests.records import consumer_record


def _event(tenant: str, at: datetime, charge: str, **fields: Any) -> dict[str, Any]:
    return usage_event(
        tenant,
        customer_charge_usd=charge,
        occurred_at=clock.iso(at),
        input_tokens=100,
        output_tokens=10,
        **fields,
    )


async def _fill(pool: asyncpg.Pool, events: Sequence[dict[str, Any]]) -> None:
    """Through both consumers' own handlers: the real paths that keep every derived number."""
    records = [consumer_record(encode(e), offset=n) for n, e in enumerate(events)]
    await UsageRecorder(pool=pool, clock=clock.now).record_batch(records)
    await BudgetCounter(pool=pool, clock=clock.now).record_batch(records)


async def _policy(pool: asyncpg.Pool, tenant: str, monthly: str) -> None:
    await pool.execute(
        "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, monthly_limit_usd) "
        "VALUES ($1, 'tenant', $1, $2)",
        tenant,
        Decimal(monthly),
    )


async def _publish(pool: asyncpg.Pool, settings: Settings, tenants: Sequence[str]) -> None:
    """What the relay does: every pending alert of `tenants` on the topic, then marked."""
    rows = await pool.fetch(
        "SELECT alert_id, tenant_id, payload FROM budget_alert_outbox "
        "WHERE tenant_id = ANY($1::text[]) AND published_at IS NULL ORDER BY seq",
        list(tenants),
    )
    await produce(
        settings.kafka_bootstrap_servers,
        settings.alerts_topic,
        [(row["tenant_id"].encode(), row["payload"].encode()) for row in rows],
    )
    await pool.execute(
        "UPDATE budget_alert_outbox SET published_at = now() WHERE alert_id = ANY($1::text[])",
        [row["alert_id"] for row in rows],
    )


def _amend(event: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An amend of `event`, as `llm-usage events amend` publishes it (a partial one here)."""
    return {
        "event_type": "llm_usage_corrected",
        "schema_version": 1,
        "correction_id": unique("corr"),
        "gateway_request_id": event["gateway_request_id"],
        "tenant_id": event["tenant_id"],
        "action": "amend",
        "fields": fields,
        "reason": "a reconcile test",
        "actor": "tests",
        "occurred_at": clock.iso(clock.earlier_today()),
        "event_occurred_at": event["occurred_at"],
    }


def _named(drifts: Sequence[Drift]) -> dict[str, list[tuple[str, Any]]]:
    by_tenant: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for drift in drifts:
        by_tenant[drift.tenant_id].append((drift.kind.value, drift.as_json()["difference"]))
    return dict(by_tenant)


async def test_no_drift_on_what_the_consumers_wrote_and_each_injected_drift_named_exactly(
    rollup_db: tuple[str, asyncpg.Pool], kafka_bootstrap_servers: str
) -> None:
    url, pool = rollup_db
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap_servers,
        database_url=url,
        alerts_topic=f"{unique('it')}.alerts",
    )
    await ensure_topics(settings, [settings.alerts_topic], partitions=2, replication_factor=1)
    now = clock.now()
    today = clock.earlier_today()
    last_month = datetime.combine(clock.this_month() - timedelta(days=10), time(12), UTC)
    months = [period_of(last_month.date()), period_of(today.date())]
    clean, counter, totals, dimension, invoice = (
        unique(n) for n in ("clean", "cnt", "tot", "dim", "inv")
    )
    missing, unpublished, off_topic, not_stored, twice, held = (
        unique(n) for n in ("miss", "unpub", "offt", "nost", "twice", "held")
    )
    corrected, waiting, extra = unique("corr"), unique("wait"), unique("extra")
    alerting = [clean, missing, unpublished, off_topic, not_stored, twice]
    for tenant in alerting:
        await _policy(pool, tenant, "0.019")  # a warning only
    events = []
    for tenant in [clean, counter, totals, dimension, held, corrected, *alerting[1:]]:
        events += [
            _event(tenant, today, "0.0054", deployment_id="dep-1", user_id="u-1"),
            _event(tenant, today, "0.0100", deployment_id="dep-2", user_id=None, agent_id="a-1"),
        ]
    for tenant in (clean, invoice):
        events += [
            _event(tenant, last_month, "0.0025", deployment_id="dep-1"),
            _event(tenant, last_month, "0.0025", deployment_id="dep-1"),
            _event(tenant, last_month, "1.005", deployment_id=None),
        ]
    await _fill(pool, events)
    # An amend of a charge and of reasoning tokens, for `corrected` and `clean`, through both
    # consumers: the aggregates, the counters and the budget's records move with it.
    amended = [e for e in events if e["tenant_id"] in (clean, corrected)][:1] + [
        e for e in events if e["tenant_id"] == corrected
    ][:1]
    corrections = [
        consumer_record(
            encode(_amend(e, customer_charge_usd="0.0060", reasoning_tokens=7)), offset=n
        )
        for n, e in enumerate(amended)
    ]
    await UsageRecorder(pool=pool, clock=clock.now).record_batch(corrections)
    await BudgetCounter(pool=pool, clock=clock.now).record_batch(corrections)
    assert await pool.fetchval(
        "SELECT count(*) FROM budget_corrections WHERE tenant_id = ANY($1::text[])",
        [clean, corrected],
    ) == len(amended)
    await close_month(pool, period=months[0], now=now)
    await _publish(pool, settings, [clean, not_stored, twice])

    # Undisturbed: nothing, over both months, whatever the confirmation.
    report = await reconcile(pool, settings, periods=months, confirm_seconds=0, now=now)
    assert report.drifts == [], [d.text() for d in report.drifts]
    assert report.events == len(events)
    assert sum(report.by_kind.values()) == 0

    # Each drift alone, on its own tenant.
    await pool.execute(
        "UPDATE budget_spend SET spend_usd = spend_usd + 0.01 WHERE tenant_id = $1 "
        "AND scope_type = 'deployment' AND scope_id = 'dep-1' AND \"window\" = 'monthly'",
        counter,
    )
    await pool.execute(
        "DELETE FROM usage_daily_totals WHERE tenant_id = $1 AND deployment_id = 'dep-2'", totals
    )
    await pool.execute(
        "UPDATE usage_daily_dimensions SET input_tokens = input_tokens - 1 "
        "WHERE tenant_id = $1 AND dimension = 'user' AND key = 'u-1'",
        dimension,
    )
    async with pool.acquire() as connection, connection.transaction():  # as the owner
        await connection.execute(
            "ALTER TABLE invoice_lines DISABLE TRIGGER invoice_lines_frozen_once_closed"
        )
        await connection.execute(
            "UPDATE invoice_lines SET amount_cents = amount_cents + 1 "
            "WHERE tenant_id = $1 AND deployment_id IS NULL",
            invoice,
        )
        await connection.execute(
            "ALTER TABLE invoice_lines ENABLE TRIGGER invoice_lines_frozen_once_closed"
        )
    await pool.execute("DELETE FROM budget_alert_outbox WHERE tenant_id = $1", missing)
    await pool.execute(
        # A constant, not `created_at - interval`: Citus refuses a STABLE function of a column
        # in an UPDATE.
        "UPDATE budget_alert_outbox SET created_at = $2 WHERE tenant_id = $1",
        unpublished,
        datetime.now(UTC) - timedelta(minutes=10),  # the database's clock, not the workers'
    )
    await pool.execute("DELETE FROM budget_alert_outbox WHERE tenant_id = $1", not_stored)
    await pool.execute(
        "UPDATE budget_alert_outbox SET published_at = now() WHERE tenant_id = $1", off_topic
    )
    [again] = await pool.fetch(
        "SELECT payload FROM budget_alert_outbox WHERE tenant_id = $1", twice
    )
    await produce(
        kafka_bootstrap_servers, settings.alerts_topic, [(twice.encode(), again[0].encode())]
    )
    await pool.execute(
        "UPDATE budget_held SET placed_usd = placed_usd + 1 WHERE tenant_id = $1", held
    )
    await pool.execute(
        'INSERT INTO budget_held (tenant_id, scope_type, scope_id, "window", period_start, '
        "placed_usd) VALUES ($1, 'tenant', $1, 'daily', $2, 1)",
        held,
        today.date(),
    )

    # Rows of zeros (everything in them voided) equal no row at all; a counter no event makes
    # is all drift.
    await pool.execute(
        "INSERT INTO usage_daily_totals (tenant_id, deployment_id, day, charge_usd, input_tokens, "
        "output_tokens, requests) VALUES ($1, 'dep-zero', $2, 0, 0, 0, 0)",
        clean,
        today.date(),
    )
    await pool.execute(
        "INSERT INTO usage_daily_dimensions (tenant_id, dimension, day, key, requests, "
        "input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, total_tokens, "
        "charge_usd) VALUES ($1, 'user', $2, NULL, 0, 0, 0, 0, 0, 0, 0)",
        clean,
        today.date() - timedelta(days=1) if today.day > 1 else today.date() + timedelta(days=1),
    )
    await pool.execute(
        'INSERT INTO budget_spend (tenant_id, scope_type, scope_id, "window", period_start, '
        "spend_usd) VALUES ($1, 'user', 'u-ghost', 'monthly', $2, 0.5)",
        extra,
        clock.this_month(),
    )
    await pool.execute("DELETE FROM budget_corrections WHERE tenant_id = $1", corrected)
    await pool.execute(
        "UPDATE usage_event_effective SET reasoning_tokens = reasoning_tokens + 1 "
        "WHERE tenant_id = $1",
        corrected,
    )
    await pool.execute(
        "INSERT INTO correction_waits (consumer, tenant_id, correction_id, gateway_request_id, "
        "record_topic, record_partition, record_offset, record_value, first_seen_at, wait_until) "
        "VALUES ('usage', $1, 'c-stuck', 'req-never', 'usage', 0, 0, '\\x7b7d', $2, $2)",
        waiting,
        datetime.now(UTC) - timedelta(hours=1),  # the database's clock, not the workers'
    )

    report = await reconcile(pool, settings, periods=months, confirm_seconds=0.2, now=now)
    assert report.confirmed_after_seconds == 0.2
    found = _named(report.drifts)
    assert clean not in found, found[clean]
    day, month = today.date().isoformat(), clock.this_month().isoformat()
    assert found == {
        counter: [("budget_counter", "0.0100")],
        totals: [
            (
                "usage_total",
                {
                    "charge_usd": "-0.0100",
                    "input_tokens": -100,
                    "output_tokens": -10,
                    "requests": -1,
                },
            )
        ],
        dimension: [("usage_dimension", {"input_tokens": -1})],
        invoice: [("invoice_total", 1)],
        missing: [("alert_missing", -1)],
        unpublished: [("alert_unpublished", -1)],
        off_topic: [("alert_not_on_topic", -1)],
        not_stored: [("alert_not_in_outbox", 1)],
        twice: [("alert_twice_on_topic", 1)],
        held: [("hold_ledger", "1")],
        # The edited row is what the effective view reads: each dimension's sum of it too.
        corrected: [("usage_dimension", {"reasoning_tokens": -1})] * 7
        + [("correction_effective", {"reasoning_tokens": 1}), ("correction_budget", -1)],
        waiting: [("correction_stuck", 1)],
        extra: [("budget_counter", "0.5")],
    }
    keys = {d.tenant_id: d.as_json()["key"] for d in report.drifts}
    assert keys[counter] == {
        "tenant_id": counter,
        "scope_type": "deployment",
        "scope_id": "dep-1",
        "window": "monthly",
        "period_start": month,
    }
    assert keys[totals] == {"tenant_id": totals, "deployment_id": "dep-2", "day": day}
    assert keys[invoice] == {"tenant_id": invoice, "deployment_id": None, "period": months[0]}
    assert report.by_kind["budget_counter"] == 2

    # The command: one tenant clean (exit 0), one drifting (exit 1), as JSON lines.
    env = {
        "DATABASE_URL": url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers,
        "ALERTS_TOPIC": settings.alerts_topic,
        "LOG_FORMAT": "json",
    }
    ok = _cli(env, "reconcile", "--tenant", clean, "--confirm-seconds", "0")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"reconcile {months[1]}: 0 drift(s); 2 events in ")
    drifting = _cli(env, "reconcile", "--tenant", counter, "--json", "--no-topic")
    assert drifting.returncode == 1, drifting.stderr
    *lines, summary = [json.loads(line) for line in drifting.stdout.splitlines()]
    assert [(line["kind"], line["expected"], line["found"]) for line in lines] == [
        ("budget_counter", "0.0054", "0.0154"),
    ]
    assert summary["summary"]["drifts"] == 1
    assert summary["summary"]["confirmed_after_seconds"] == 5.0
    refused = _cli(env, "reconcile", "--period", "2026-13")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_usage", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_reconcile_of_a_database_not_migrated_is_one_line_and_exit_2(
    empty_database_url: str,
) -> None:
    refused = _cli({"DATABASE_URL": empty_database_url}, "reconcile", "--no-topic")
    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("llm-usage: error: reconcile could not run: UndefinedTableError"), line
