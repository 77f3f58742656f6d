"""Consume budget alerts the way the notification service should: read committed records only,
handle each alert_id once (remembered in SQLite, so a restart does not notify twice), commit the
offset only after the alert was handled.

Run against the local stack:
    eval "$(llm-usage dev env)" && python docs/examples/consume_budget_alerts.py --exit-when-idle 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError


@dataclass(frozen=True)
class Alert:
    """The fields of a budget alert v1 a notification needs, amounts as exact decimals."""

    alert_id: str
    tenant_id: str
    scope_type: str
    scope_id: str
    window: str
    period_start: date
    level: str
    spend_usd: Decimal
    limit_usd: Decimal
    threshold_pct: int
    triggered_by: str | None
    emitted_at: datetime


def decode(value: bytes) -> Alert:
    # parse_float=Decimal: should a number ever appear, it is never turned into a binary float.
    # The amounts themselves are strings; Decimal(str) keeps every digit.
    fields = json.loads(value, parse_float=Decimal)
    if fields.get("event_type") != "llm_budget_alert" or fields.get("schema_version") != 1:
        # Stop rather than skip: the offset stays uncommitted, nothing is lost, and a consumer
        # that knows the new version reads it after an upgrade.
        raise SystemExit(f"not a budget alert v1 (upgrade this consumer): {value[:200]!r}")
    return Alert(
        alert_id=fields["alert_id"],
        tenant_id=fields["tenant_id"],
        scope_type=fields["scope_type"],
        scope_id=fields["scope_id"],
        window=fields["window"],
        period_start=date.fromisoformat(fields["period_start"]),
        level=fields["level"],
        spend_usd=Decimal(fields["spend_usd"]),
        limit_usd=Decimal(fields["limit_usd"]),
        threshold_pct=fields["threshold_pct"],
        triggered_by=fields["triggered_by"],
        emitted_at=datetime.fromisoformat(fields["emitted_at"]),
    )


class HandledAlerts:
    """The alert_ids already handled. With several replicas of your service, keep this table in
    your shared database instead (same columns, `INSERT ... ON CONFLICT DO NOTHING`)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path)
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS handled_alerts ("
                " alert_id TEXT PRIMARY KEY, emitted_at TEXT NOT NULL, handled_at TEXT NOT NULL)"
            )

    def contains(self, alert_id: str) -> bool:
        query = "SELECT 1 FROM handled_alerts WHERE alert_id = ?"
        return self._db.execute(query, (alert_id,)).fetchone() is not None

    def add(self, alert: Alert) -> None:
        with self._db:  # one committed transaction per alert
            self._db.execute(
                "INSERT OR IGNORE INTO handled_alerts VALUES (?, ?, datetime('now'))",
                (alert.alert_id, alert.emitted_at.isoformat()),
            )

    def close(self) -> None:
        self._db.close()


def notify(alert: Alert) -> None:
    """Your side effect (an e-mail, a chat message). Where the channel takes an idempotency key,
    pass the alert_id: then even a crash between sending and remembering cannot send twice."""
    cause = f"triggered by {alert.triggered_by}" if alert.triggered_by else "policy change"
    print(
        f"new alert {alert.alert_id}: {alert.tenant_id} {alert.scope_type}/{alert.scope_id} "
        # Format amounts with "f": str(Decimal) writes 0.000000000000000003 as 3E-18.
        f"{alert.window} {alert.period_start} {alert.level}: spend {alert.spend_usd:f} "
        f"of limit {alert.limit_usd:f} (threshold {alert.threshold_pct}%), {cause}",
        flush=True,
    )


async def at_end_of_assignment(consumer: AIOKafkaConsumer) -> bool:
    """Whether the consumer holds partitions and has read each of them to its end."""
    assigned = list(consumer.assignment())
    if not assigned:
        return False
    ends = await consumer.end_offsets(assigned)
    positions = [await consumer.position(tp) for tp in assigned]
    return all(position >= ends[tp] for tp, position in zip(assigned, positions, strict=True))


async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    if not offsets:
        return
    try:
        await consumer.commit(offsets)
    except CommitFailedError as error:
        # A rebalance gave the partition away: its new owner reads these records again, and
        # HandledAlerts makes that harmless.
        print(f"commit failed, records will be read again: {error}", file=sys.stderr)
    offsets.clear()


async def consume(args: argparse.Namespace) -> None:
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group,
        enable_auto_commit=False,  # commit only what was handled
        auto_offset_reset="earliest",  # a new group reads the retained alerts: none is missed
        isolation_level="read_committed",
    )
    handled = HandledAlerts(args.handled_db)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await consumer.start()
    new_alerts = 0
    idle_since: float | None = None
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500)
            to_commit: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                for record in records:  # in partition order: warning before exceeded
                    alert = decode(record.value)
                    if handled.contains(alert.alert_id):
                        print(f"already handled {alert.alert_id}, skipped", file=sys.stderr)
                    else:
                        notify(alert)
                        handled.add(alert)
                        new_alerts += 1
                    to_commit[tp] = record.offset + 1
                    if args.max_alerts is not None and new_alerts >= args.max_alerts:
                        await commit(consumer, to_commit)
                        return
            await commit(consumer, to_commit)

            if args.exit_when_idle is not None:
                if batches or not await at_end_of_assignment(consumer):
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= args.exit_when_idle:
                    return
    finally:
        await consumer.stop()  # leaves the group at once: its partitions move without delay
        handled.close()
        print(f"{new_alerts} new alert(s) handled", file=sys.stderr)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
    )
    parser.add_argument("--topic", default=os.environ.get("ALERTS_TOPIC", "llm_budget_alerts"))
    parser.add_argument("--group", default="budget-alert-notifications")
    parser.add_argument("--handled-db", default="handled_alerts.sqlite3", help="SQLite file")
    parser.add_argument("--max-alerts", type=int, help="exit after this many new alerts")
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="exit once every assigned partition has been read to its end for this long",
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(consume(arguments()))
