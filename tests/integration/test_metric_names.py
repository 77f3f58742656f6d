"""Every metric name the alerting rules and the dashboard use is one the real workers serve.

A usage consumer, a budget consumer, a rollup schedule and `serve api` run as real processes;
they are fed a few events (a malformed one and a conflicting duplicate among them, and enough
spend to cross a budget; one accepted and one rejected through the API's ingest, the accepted one
after a budget check that holds its estimate, and a check that a blocking limit denies) so the
labelled counters have samples, and the budget consumer settles the hold and sweeps; then their
/metrics are scraped. A rule or a panel on a name that does not exist would never fire or show
anything, silently.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_usage.kafka.topics import ensure_topics
from llm_usage.storage.migrate import migrate
from llm_usage.testing.processes import free_port
from tests.api_support import AUDIENCE, SECRET, bearer, token
from tests.artifacts.monitoring import (
    DASHBOARDS,
    PROMETHEUS_CONFIG,
    ROOT,
    alert_rules,
    dashboard_queries,
    dashboard_variable_queries,
)
from tests.integration.pipeline import (
    PipelineTopics,
    RunningConsumer,
    create_pipeline_topics,
    encode,
    produce,
    spawn_consumer,
    unique,
    usage_event,
    wait_until,
)

NAME = re.compile(r"\bllm_usage_\w+")
# `up` is Prometheus' own, per scrape target: its job selectors must name the config's jobs.
UP_SELECTOR = re.compile(r"(?<![\w:])up\s*\{([^}]*)\}")
UP_WITHOUT_SELECTOR = re.compile(r"(?<![\w:])up\b(?!\s*\{)")
JOB_MATCHER = re.compile(r'\bjob\s*(=~|=)\s*"([^"]*)"')
# Served, but with no sample until a fault happens that this test does not stage.
WITHOUT_SAMPLES_HERE = {
    "llm_usage_consumer_retries_total": "a retry after a transient failure",
    "llm_usage_consumer_undecodable_batches_total": "a record batch that cannot be decoded",
    "llm_usage_price_drift_events_total": "an event whose upstream cost drifts from the prices",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "untyped": ("",),
}


@dataclass
class Exposition:
    """What /metrics of some workers declared (# TYPE, with each type's sample names) and which
    sample names actually had samples."""

    declared: set[str] = field(default_factory=set)
    sampled: set[str] = field(default_factory=set)
    families: set[str] = field(default_factory=set)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                # The creation time of a counter or histogram, exposed as a gauge of its own.
                self.declared.add(family.name)
                continue
            self.families.add(family.name)
            self.declared.update(family.name + suffix for suffix in SUFFIXES[family.type])
            self.sampled.update(sample.name for sample in family.samples)


def used_names() -> dict[str, set[str]]:
    """Every llm_usage_* name in the rules' exprs and the dashboards' queries, with where."""
    used: dict[str, set[str]] = {}
    for where, query in queries():
        for name in NAME.findall(query):
            used.setdefault(name, set()).add(where)
    return used


def queries() -> Iterable[tuple[str, str]]:
    for rule in alert_rules():
        yield f"alert {rule.name}", rule.expr
    for dashboard in DASHBOARDS:
        for where, query in dashboard_queries(dashboard):
            yield f"{dashboard.name} {where}", query
        for query in dashboard_variable_queries(dashboard):
            yield f"{dashboard.name} variable", query


def scrape_jobs() -> set[str]:
    return set(re.findall(r"job_name:\s*['\"]?([\w.-]+)", PROMETHEUS_CONFIG.read_text()))


def test_rules_and_dashboards_use_names_this_test_can_find() -> None:
    """The name extraction works at all: it finds the names the rules are built on."""
    used = used_names()
    assert "llm_usage_consumer_lag" in used
    assert "llm_usage_consumer_batch_duration_seconds_bucket" in used
    assert any(where.endswith(".json variable") for uses in used.values() for where in uses)


def test_up_selects_only_the_configured_scrape_jobs() -> None:
    jobs = scrape_jobs()
    assert jobs == {
        "llm-usage-consume-usage",
        "llm-usage-consume-budget",
        "llm-usage-rollup-schedule",
        "llm-usage-api",
    }
    selectors = 0
    for where, query in queries():
        assert not UP_WITHOUT_SELECTOR.search(query), f"{where}: `up` without a job selector"
        for selector in UP_SELECTOR.findall(query):
            selectors += 1
            matchers = JOB_MATCHER.findall(selector)
            assert matchers, f"{where}: up{{{selector}}} selects no job"
            for operator, value in matchers:
                named = set(value.split("|")) if operator == "=~" else {value}
                assert named <= jobs, f"{where}: jobs {named - jobs} are not scraped"
    assert selectors >= 3


def test_the_kubernetes_workers_are_scraped_as_those_jobs() -> None:
    """deploy/prometheus/prometheus-kubernetes.yml takes `job` from app.kubernetes.io/name: the
    workers' pods in deploy/k8s must carry the job names the rules use."""
    base = ROOT / "deploy" / "k8s" / "base"
    assert base.is_dir(), "deploy/k8s/base is gone: the workers' manifests must stay scraped"
    scraped = set()
    for manifest in base.glob("*.yaml"):
        text = manifest.read_text()
        if re.search(r"prometheus\.io/scrape:\s*['\"]true['\"]", text):
            scraped.update(re.findall(r"app\.kubernetes\.io/name:\s*['\"]?([\w.-]+)", text))
    assert scraped == scrape_jobs()


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())
    except (urllib.error.URLError, OSError):
        return None


async def has_sample(port: int, name: str) -> bool:
    """Whether the worker at `port` serves at least one sample of `name`."""
    text = await asyncio.to_thread(scrape, port)
    return any(
        sample.name == name
        for family in text_string_to_metric_families(text or "")
        for sample in family.samples
    )


async def sample_value(port: int, name: str, **labels: str) -> float:
    """The sum of `name`'s samples with these labels on the worker at `port` (0 when none)."""
    text = await asyncio.to_thread(scrape, port)
    total = 0.0
    for family in text_string_to_metric_families(text or ""):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@dataclass
class Workers:
    usage: RunningConsumer
    budget: RunningConsumer
    rollup: asyncio.subprocess.Process
    api: asyncio.subprocess.Process
    ports: dict[str, int]

    def logs(self) -> str:
        return f"usage:\n{self.usage.log_tail()}\nbudget:\n{self.budget.log_tail()}"


@pytest.fixture
async def workers(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> AsyncIterator[Workers]:
    topics = await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers, database_url=database_url, partitions=2
    )
    await ensure_topics(
        topics.settings, [topics.settings.alerts_topic], partitions=1, replication_factor=1
    )
    ports = {"usage": free_port(), "budget": free_port(), "rollup": free_port(), "api": free_port()}
    # The consumers get a database of their own: the budget relay publishes every unsent alert
    # in its database, and the session's holds other tests' alerts.
    consumers_database = await own_database(database_url)
    usage = await spawn_consumer(
        topics,
        env={
            **topics.environment(),
            "DATABASE_URL": consumers_database,
            "METRICS_PORT": str(ports["usage"]),
        },
    )
    budget = await spawn_consumer(
        topics,
        env={
            **topics.environment(),
            "DATABASE_URL": consumers_database,
            "METRICS_PORT": str(ports["budget"]),
            "BUDGET_POLICY_SWEEP_SECONDS": "2",
        },
        worker="budget",
    )
    rollup_database = await own_database(database_url)
    rollup = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "llm_usage", "rollup", "schedule"),
        env={
            **os.environ,
            "DATABASE_URL": rollup_database,
            "METRICS_PORT": str(ports["rollup"]),
            "LOG_FORMAT": "json",
        },
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    # `serve api` serves /metrics on API_PORT; it publishes to the same usage topic.
    api = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "llm_usage", "serve", "api"),
        env={
            **topics.environment(),
            "DATABASE_URL": consumers_database,
            "API_HOST": "127.0.0.1",
            "API_PORT": str(ports["api"]),
            "API_JWT_SECRET": SECRET,
            "API_JWT_AUDIENCE": AUDIENCE,
        },
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    running = Workers(usage, budget, rollup, api, ports)
    try:
        await feed(topics, consumers_database)
        await feed_api(ports["api"], consumers_database)
        yield running
    finally:
        for process in (usage.process, budget.process, rollup, api):
            if process.returncode is None:
                process.terminate()
        for process in (usage.process, budget.process, rollup, api):
            try:
                await asyncio.wait_for(process.wait(), 40)
            except TimeoutError:
                process.kill()
                await process.wait()
        await usage.reader
        await budget.reader
        await drop_database(database_url, rollup_database)
        await drop_database(database_url, consumers_database)


async def own_database(database_url: str) -> str:
    """A migrated database of this test's own, for the rollup schedule: which months are closed
    is global to a database, and the schedule closes every past month with usage."""
    name = f"metrics_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    scheme, _, rest = database_url.partition("://")
    authority, _, tail = rest.partition("/")
    _, query_mark, query = tail.partition("?")
    url = f"{scheme}://{authority}/{name}" + (f"?{query}" if query_mark else "")
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    return url


async def drop_database(database_url: str, url: str) -> None:
    name = url.partition("://")[2].partition("/")[2].partition("?")[0]
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def feed(topics: PipelineTopics, database_url: str) -> None:
    """Events that give every labelled counter the rules use a sample: recorded events that cross
    a budget's warning and exceeded levels, a malformed record and a conflicting duplicate."""
    tenant = unique("tenant")
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, monthly_limit_usd, "
                "warn_threshold_pct) VALUES ($1, 'tenant', $1, $2, 80)",
                tenant,
                Decimal("1.00"),
            )
            await connection.execute("SELECT pg_notify('budget_policies', $1)", tenant)
    finally:
        await connection.close()
    events = [usage_event(tenant, customer_charge_usd="0.30") for _ in range(4)]
    conflicting = {**events[0], "customer_charge_usd": "0.31", "customer_charge_cents": 31}
    values = [encode(event) for event in events] + [b"{not json", encode(conflicting)]
    # One key, one partition: the conflicting duplicate comes after the event it conflicts with.
    await produce(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        [(tenant.encode(), value) for value in values],
    )


async def feed_api(port: int, database_url: str) -> None:
    """Once the API listens: a budget check it allows (holding the estimate) and one a blocking
    limit denies; then the allowed request's event, which it accepts (it lands on the usage topic,
    and the budget consumer settles the hold), and one it rejects: the check and ingest counters
    get every result, the request counter and histogram a sample."""

    async def listening() -> bool:
        return await asyncio.to_thread(scrape, port) is not None

    await wait_until(listening, within=60, message=f"`serve api` never listened on {port}")
    tenant, blocked = unique("api-tenant"), unique("api-blocked")
    await asyncpg_execute(
        database_url,
        "INSERT INTO budget_policies (tenant_id, scope_type, scope_id, daily_limit_usd, "
        "enforcement) VALUES ($1, 'tenant', $1, 0.001, 'block')",
        blocked,
    )
    allowed = usage_event(tenant)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for check_tenant, request_id, decision in (
            (tenant, allowed["gateway_request_id"], "allow"),
            (blocked, unique("req"), "deny"),
        ):
            answer = await client.post(
                "/v1/budget-checks",
                json={
                    "gateway_request_id": request_id,
                    "tenant_id": check_tenant,
                    "estimated_charge_usd": "0.01",
                },
                headers=bearer(token("gateway")),
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["decision"] == decision, answer.text
        answer = await client.post(
            "/v1/usage-events",
            json=[allowed, usage_event(tenant, input_tokens=-1)],
            headers=bearer(token("platform-admin")),
        )
    assert answer.status_code == 200, answer.text
    assert [r["status"] for r in answer.json()["results"]] == ["accepted", "rejected"]


async def asyncpg_execute(database_url: str, statement: str, *args: object) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(statement, *args)
    finally:
        await connection.close()


async def test_every_metric_the_rules_and_the_dashboard_use_is_served(workers: Workers) -> None:
    ports = workers.ports

    # (worker, sample name, labels, at least): what the feed must have produced.
    expected = [
        ("usage", "llm_usage_consumer_events_total", {"result": "recorded"}, 4),
        ("usage", "llm_usage_consumer_events_total", {"result": "conflict"}, 1),
        ("usage", "llm_usage_consumer_dead_letters_total", {"reason": "invalid_json"}, 1),
        ("budget", "llm_usage_consumer_events_total", {"result": "recorded"}, 4),
        ("budget", "llm_usage_budget_alerts_published_total", {}, 2),
        ("rollup", "llm_usage_rollup_last_success_timestamp_seconds", {}, 1),
        ("api", "llm_usage_api_ingested_events_total", {"result": "accepted"}, 1),
        ("api", "llm_usage_api_ingested_events_total", {"result": "rejected"}, 1),
        ("api", "llm_usage_api_requests_total", {"route": "/v1/usage-events"}, 1),
        ("api", "llm_usage_api_budget_checks_total", {"decision": "allow"}, 1),
        ("api", "llm_usage_api_budget_checks_total", {"decision": "deny"}, 1),
        ("api", "llm_usage_api_budget_check_denials_total", {"scope_type": "tenant"}, 1),
        ("budget", "llm_usage_budget_holds_ended_total", {"how": "settled"}, 1),
        ("budget", "llm_usage_budget_hold_sweeps_total", {"result": "swept"}, 1),
    ]
    seen: dict[str, float] = {}

    async def fed_through() -> bool:
        for worker, name, labels, least in expected:
            seen[f"{worker} {name}{labels}"] = value = await sample_value(
                ports[worker], name, **labels
            )
            if value < least:
                return False
        # The lag gauge is set after a batch lands, once the next poll returns (up to the poll
        # timeout later): counted events alone do not mean it has a sample yet.
        return await has_sample(ports["usage"], "llm_usage_consumer_lag")

    await wait_until(
        fed_through,
        within=120,
        message=f"the workers never counted what they were fed: {seen}\n{workers.logs()}",
    )

    served = Exposition()
    for worker, port in ports.items():
        text = await asyncio.to_thread(scrape, port)
        assert text is not None, f"{worker} on {port} serves no /metrics"
        served.add(text)
    # Exactly the warning and the exceeded alert: nothing counted twice.
    assert await sample_value(ports["budget"], "llm_usage_budget_alerts_published_total") == 2

    used = used_names()
    unknown = {name: sorted(where) for name, where in used.items() if name not in served.declared}
    assert unknown == {}, "names no worker serves"
    unsampled = {
        name: sorted(where)
        for name, where in used.items()
        if name not in served.sampled and name not in WITHOUT_SAMPLES_HERE
    }
    assert unsampled == {}, "names served without a sample"
    for name in WITHOUT_SAMPLES_HERE:
        assert name in served.declared, name

    # And the other way round: the dashboard shows every llm_usage metric the workers serve.
    on_dashboard = {
        name
        for dashboard in DASHBOARDS
        for _, query in dashboard_queries(dashboard)
        for name in NAME.findall(query)
    }
    not_shown = sorted(
        family
        for family in served.families
        if family.startswith("llm_usage_")
        and not any(name == family or name.startswith(family + "_") for name in on_dashboard)
    )
    assert not_shown == [], "served metrics the dashboard does not show"
