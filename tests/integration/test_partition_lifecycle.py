"""The partition lifecycle under load (issue 20's proof): a real usage consumer drains a backlog
spread over six months while a loop creates the months ahead and detaches, archives, verifies and
drops the oldest ones, "today" a month later every few rounds. No batch fails, and the counts are
exact: each event is stored once, or archived with its dropped month, or dead-lettered `expired`.
The p99 batch time is printed against the same drain without maintenance.

LIFECYCLE_EVENTS sets the backlog (20,000 here; `llm-usage bench lifecycle` runs 200,000),
LIFECYCLE_INTERVAL and LIFECYCLE_ADVANCE_EVERY the pace of the maintenance (1 s, a month dropped
every 3 rounds)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from llm_usage.bench.lifecycle import MONTHS_RETIRED, report, run_lifecycle
from llm_usage.core.settings import Settings
from llm_usage.domain.periods import add_months, month_start
from tests import clock
from tests.integration.pipeline import unique

EVENTS = int(os.environ.get("LIFECYCLE_EVENTS", "20000"))
# Seconds between maintenance rounds, and rounds per month dropped (4 months in all).
INTERVAL = float(os.environ.get("LIFECYCLE_INTERVAL", "1.0"))
ADVANCE_EVERY = int(os.environ.get("LIFECYCLE_ADVANCE_EVERY", "3"))
# Two drains of EVENTS on a shared 2-core machine: ~1,000 events/s at worst, both runs.
TIMEOUT_SECONDS = 300 + 2 * EVENTS // 1000


async def _own_database(database_url: str, name: str) -> str:
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))


def _settings(kafka_bootstrap_servers: str, database_url: str) -> Settings:
    return Settings(kafka_bootstrap_servers=kafka_bootstrap_servers, database_url=database_url)


@pytest.mark.timeout(TIMEOUT_SECONDS)
async def test_months_come_and_go_while_the_consumer_drains_a_backlog(
    kafka_bootstrap_servers: str, empty_database_url: str, database_url: str, tmp_path: Path
) -> None:
    maintained = await run_lifecycle(
        _settings(kafka_bootstrap_servers, empty_database_url),
        events=EVENTS,
        maintenance=True,
        work_dir=tmp_path,
        interval=INTERVAL,
        advance_every=ADVANCE_EVERY,
    )
    current = month_start(clock.today())
    assert sorted(maintained.months_retired) == [
        add_months(current, -back) for back in range(MONTHS_RETIRED + 1, 1, -1)
    ]
    assert maintained.failures == []
    assert maintained.count_errors() == []
    # The drain and the maintenance overlapped: some events were stored before their month
    # went (archived with it) and some arrived after (expired).
    assert maintained.rounds >= MONTHS_RETIRED
    assert maintained.expired_count() > 0, "every month was dropped after the drain ended"
    assert sum(maintained.archived.values()) > 0, "every month was dropped before the drain"

    plain_url = await _own_database(database_url, unique("plain").replace("-", "_"))
    plain = await run_lifecycle(
        _settings(kafka_bootstrap_servers, plain_url),
        events=EVENTS,
        maintenance=False,
        work_dir=tmp_path,
    )
    assert plain.failures == []
    assert plain.count_errors() == []
    assert plain.expired_count() == 0
    print("\n" + "\n".join(report([plain, maintained])))  # noqa: T201 - the p99s, for the report
