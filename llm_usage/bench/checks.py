"""`llm-usage bench checks`: `POST /v1/budget-checks` under load, on `bench api`'s data, by wrk.

1. Load, or reuse, the events `bench api` spreads over its tenants (bench/api_data.py, database
   `llm_usage_bench_api`). Every tenant's policy is made to block with limits so large that the
   allow path is measured (put back as it was afterwards); holds of earlier runs are emptied.
2. Start `llm-usage serve api` once per core on one port, with a `gateway` token.
3. wrk POSTs a fresh check each time (its id from the wrk thread and a counter; a random tenant,
   deployment and user of the data; a charge as the estimate):
   - one at a time (`-t1 -c1`): p50, p99, against the goal p99 < 10 ms;
   - `rate` checks/s over every tenant, paced by wrk's `delay()`: the rate reached and p99,
     against the goal p99 < 50 ms;
   - one hot tenant at each of `hot_rates` until p99 passes 50 ms (or answers fail): the ceiling;
   - one short deny-heavy step on the hot tenant (its limits set below its spend).
4. During the hot steps, `pg_stat_activity`'s wait events of the bench database are sampled every
   50 ms (Lock waits: the tenant's counter rows serialise its checks; none: CPU), with the CPU
   time of the API processes and of their PostgreSQL backends.
5. One table, the goals, what limits the hot tenant, and one JSON line.

wrk is closed-loop: when the server stalls, a connection sends nothing meanwhile, so the p99 of a
paced step understates what an open-loop client would see (coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llm_usage.bench.api import AUDIENCE, BENCH_DATABASE, start_api_servers, stop_processes
from llm_usage.bench.api_data import spread_tenant
from llm_usage.bench.wrk import WrkResult, run_wrk_script, script, wrk_binary, wrk_version

if TYPE_CHECKING:
    import asyncpg

    from llm_usage.core.settings import Settings

# Issue 23's goals.
ONE_AT_A_TIME_P99_MS: Final = 10.0
PACED_P99_MS: Final = 50.0
# What every check asks to hold, and the limits that never deny it (at most 12 whole digits).
CHECK_CHARGE_USD: Final = "0.0125"
ALLOW_ALL_LIMIT_USD: Final = Decimal("999999999999")
DENY_ALL_LIMIT_USD: Final = Decimal("0.000000000000000001")
SAMPLE_SECONDS: Final = 0.05
# The data's attributions (bench/api_data.py: 'dep-' || g % 5, 'user-' || g % 397).
DEPLOYMENTS: Final = 5
USERS: Final = 397
# A connection sends at most this many paced checks a second: enough connections for a rate.
PER_CONNECTION_RATE: Final = 20
MAX_CONNECTIONS: Final = 64

_CHECK_REQUEST = """\
local tenants = {
%(tenants)s
}
local counter = 0
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  local body = string.format(
    '{"gateway_request_id": "%(run)s-%%d-%%d", "tenant_id": "%%s", "deployment_id": "dep-%%d", '
    .. '"user_id": "user-%%d", "estimated_charge_usd": "%(charge)s"}',
    seed, counter, tenants[math.random(#tenants)],
    math.random(0, %(last_deployment)d), math.random(0, %(last_user)d))
  return wrk.format("POST", "/v1/budget-checks", nil, body)
end
"""

_SELECT_POLICIES = """
    SELECT tenant_id, scope_type, scope_id, daily_limit_usd, monthly_limit_usd, enforcement
    FROM budget_policies WHERE tenant_id = ANY($1::text[])
"""
_SET_LIMITS = """
    UPDATE budget_policies
    SET daily_limit_usd = $2, monthly_limit_usd = $2, enforcement = 'block'
    WHERE tenant_id = ANY($1::text[])
"""
_RESTORE_POLICIES = """
    UPDATE budget_policies AS p
    SET daily_limit_usd = o.daily, monthly_limit_usd = o.monthly, enforcement = o.enforcement
    FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::text[])
        AS o (tenant_id, scope_type, scope_id, daily, monthly, enforcement)
    WHERE p.tenant_id = o.tenant_id AND p.scope_type = o.scope_type AND p.scope_id = o.scope_id
"""
_DECISIONS = "SELECT decision, count(*) AS n FROM budget_holds GROUP BY decision"
# Active backends of this database but the sampler's own: on CPU when they wait for nothing.
_WAITS = """
    SELECT coalesce(wait_event_type || '/' || wait_event, 'CPU') AS what, count(*) AS n
    FROM pg_stat_activity
    WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
    GROUP BY 1
"""
_BACKENDS = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND backend_type = 'client backend'
        AND pid <> pg_backend_pid()
"""


def check_script(tenants: Sequence[str], *, run: str, delay_ms: int | None) -> str:
    """The wrk script that POSTs a new check each time, for a random one of `tenants`; ids are
    `run`-thread-counter, so no two checks of a run (or of two runs) share one."""
    listed = ",\n".join(f"  {json.dumps(tenant)}" for tenant in tenants)
    request = _CHECK_REQUEST % {
        "tenants": listed,
        "run": run,
        "charge": CHECK_CHARGE_USD,
        "last_deployment": DEPLOYMENTS - 1,
        "last_user": USERS - 1,
    }
    return script(request, delay_ms=delay_ms)


def pacing(rate: int) -> tuple[int, int]:
    """Connections and each one's delay (ms) before a request, so that all send `rate` a second
    while the server keeps up: delay = connections x 1000 / rate."""
    connections = min(MAX_CONNECTIONS, max(1, -(-rate // PER_CONNECTION_RATE)))
    return connections, max(1, round(connections * 1000 / rate))


@dataclass(frozen=True)
class Step:
    """One wrk run: what was asked, what wrk measured, what the database decided meanwhile."""

    name: str
    rate: int | None  # None: as fast as one connection goes
    connections: int
    result: WrkResult
    allowed: int
    denied: int
    waits: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    api_cpu_seconds: float = 0.0
    database_cpu_seconds: float | None = None

    @property
    def reached(self) -> float:
        return self.result.per_second

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "rate": self.rate,
            "connections": self.connections,
            "reached_per_second": round(self.reached, 1),
            "p50_ms": self.result.p50_ms,
            "p99_ms": self.result.p99_ms,
            "max_ms": self.result.max_ms,
            "allowed": self.allowed,
            "denied": self.denied,
            "non_2xx": self.result.non_2xx,
            "waits": dict(self.waits),
            "samples": self.samples,
            "api_cpu_seconds": round(self.api_cpu_seconds, 2),
            "database_cpu_seconds": (
                None if self.database_cpu_seconds is None else round(self.database_cpu_seconds, 2)
            ),
        }


def _cpu_seconds(pid: int, *, command: str | None = None) -> float | None:
    """User + system CPU time of `pid` from /proc (None when it is not there, or is not
    `command`: a database in a container has backends of another pid namespace)."""
    proc = Path("/proc") / str(pid)
    try:
        if command is not None and not proc.joinpath("comm").read_text().startswith(command):
            return None
        fields = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are the 14th and 15th fields; the split starts at the 3rd.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Watch:
    """Wait events sampled every 50 ms while a step runs, and the CPU time the API processes and
    their database backends spent in it."""

    def __init__(self, connection: asyncpg.Connection, api_pids: Sequence[int]) -> None:
        self._connection = connection
        self._api_pids = list(api_pids)
        self.waits: Counter[str] = Counter()
        self.samples = 0

    async def _sample(self) -> None:
        while True:
            for row in await self._connection.fetch(_WAITS):
                self.waits[row["what"]] += row["n"]
            self.samples += 1
            await asyncio.sleep(SAMPLE_SECONDS)

    async def _cpu(self) -> tuple[float, float | None]:
        api = sum(_cpu_seconds(pid) or 0.0 for pid in self._api_pids)
        backends = [_cpu_seconds(row["pid"], command="postgres") for row in await self._pids()]
        database = None if not backends or None in backends else sum(filter(None, backends))
        return api, database

    async def _pids(self) -> list[asyncpg.Record]:
        return await self._connection.fetch(_BACKENDS)

    async def around(
        self, step: asyncio.Future[WrkResult]
    ) -> tuple[WrkResult, float, float | None]:
        api_before, database_before = await self._cpu()
        sampler = asyncio.create_task(self._sample())
        try:
            result = await step
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        api_after, database_after = await self._cpu()
        database = (
            None
            if database_before is None or database_after is None
            else database_after - database_before
        )
        return result, api_after - api_before, database


async def _decisions(connection: asyncpg.Connection) -> Counter[str]:
    return Counter({row["decision"]: row["n"] for row in await connection.fetch(_DECISIONS)})


async def run_checks_benchmark(
    *, events: int, tenants: int, seconds: float, rate: int, hot_rates: list[int]
) -> None:
    from llm_usage.local.run import settings_for_local_run  # noqa: PLC0415

    wrk_binary()  # before anything is started or loaded
    await measure_checks(
        # In a thread: starting the services runs event loops of its own.
        await asyncio.to_thread(settings_for_local_run),
        database=BENCH_DATABASE,
        events=events,
        tenants=tenants,
        seconds=seconds,
        rate=rate,
        hot_rates=hot_rates,
    )


async def measure_checks(
    settings: Settings,
    *,
    database: str,
    events: int,
    tenants: int,
    seconds: float,
    rate: int,
    hot_rates: list[int],
) -> list[Step]:
    """The whole benchmark against the services of `settings`, in database `database`."""
    import asyncpg  # noqa: PLC0415 - the database stack, when the benchmark runs
    import jwt  # noqa: PLC0415

    from llm_usage.bench.api_data import load_bench_data  # noqa: PLC0415
    from llm_usage.bench.support import bench_database  # noqa: PLC0415
    from llm_usage.storage.migrate import migrate  # noqa: PLC0415

    wrk = await wrk_version()
    url = await bench_database(settings.database_url, database)
    names = [spread_tenant(index) for index in range(tenants)]
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        server_version = await connection.fetchval("SHOW server_version")
        await load_bench_data(
            connection, sizes=[], events=events, tenants=tenants, now=datetime.now(UTC)
        )
        before = await connection.fetch(_SELECT_POLICIES, names)
        await connection.execute("TRUNCATE budget_holds, budget_held")
        await connection.execute(_SET_LIMITS, names, ALLOW_ALL_LIMIT_USD)
        secret = secrets.token_hex(32)
        cores = os.cpu_count() or 1
        processes, base = await start_api_servers(settings, url, secret, cores)
        claims = {"aud": AUDIENCE, "exp": int(time.time()) + 86400, "sub": "bench"}
        gateway = jwt.encode({**claims, "role": "gateway"}, secret, algorithm="HS256")
        try:
            steps = await _steps(
                connection,
                base,
                [f"Authorization: Bearer {gateway}"],
                [process.pid for process in processes],
                names,
                seconds=seconds,
                rate=rate,
                hot_rates=hot_rates,
            )
        finally:
            await stop_processes(processes)
            await _restore(connection, before)
    finally:
        await connection.close()
    print(
        f"\nPOST /v1/budget-checks on {events:,} events over {tenants:,} tenants; {wrk}; "
        f"{cores} API processes on {cores} CPUs; PostgreSQL {server_version}; "
        f"{seconds:g} s a step; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print(steps_table(steps))
    print(goal_lines(steps, rate=rate, tenants=tenants))
    print(limit_lines(steps))
    print(json.dumps({"bench": "checks", "steps": [step.to_json() for step in steps]}))
    return steps


async def _restore(connection: asyncpg.Connection, before: Sequence[asyncpg.Record]) -> None:
    """The tenants' policies as they were, and no holds left for `bench api`'s budgets."""
    columns = ("tenant_id", "scope_type", "scope_id", "daily_limit_usd", "monthly_limit_usd")
    await connection.execute(
        _RESTORE_POLICIES,
        *([row[column] for row in before] for column in (*columns, "enforcement")),
    )
    await connection.execute("TRUNCATE budget_holds, budget_held")


async def _steps(
    connection: asyncpg.Connection,
    base: str,
    headers: list[str],
    api_pids: list[int],
    names: list[str],
    *,
    seconds: float,
    rate: int,
    hot_rates: list[int],
) -> list[Step]:
    cores = os.cpu_count() or 1
    hot = names[:1]

    async def step(
        name: str,
        tenants: list[str],
        step_rate: int | None,
        *,
        watched: bool = False,
        errors_allowed: bool = False,
        length: float = seconds,
    ) -> Step:
        connections, delay = (1, None) if step_rate is None else pacing(step_rate)
        found = await measured(
            name,
            tenants,
            step_rate,
            connections,
            delay,
            watched=watched,
            errors_allowed=errors_allowed,
            length=length,
        )
        # wrk is closed-loop: each connection waits its delay after an answer, so the rate
        # reached falls short by the answers' latency. Once, take that latency off the delay.
        if step_rate is not None and delay is not None and found.reached < 0.95 * step_rate:
            shorter = max(1, delay - round(found.result.p50_ms))
            if shorter < delay:
                found = await measured(
                    name,
                    tenants,
                    step_rate,
                    connections,
                    shorter,
                    watched=watched,
                    errors_allowed=errors_allowed,
                    length=length,
                )
        return found

    async def measured(
        name: str,
        tenants: list[str],
        step_rate: int | None,
        connections: int,
        delay: int | None,
        *,
        watched: bool,
        errors_allowed: bool,
        length: float,
    ) -> Step:
        text = check_script(tenants, run=uuid.uuid4().hex[:12], delay_ms=delay)
        before = await _decisions(connection)
        running = asyncio.ensure_future(
            run_wrk_script(
                base,
                text,
                connections=connections,
                threads=min(cores, connections),
                seconds=length,
                headers=headers,
                errors_allowed=errors_allowed,
            )
        )
        watch = _Watch(connection, api_pids)
        if watched:
            result, api_cpu, database_cpu = await watch.around(running)
        else:
            result, api_cpu, database_cpu = await running, 0.0, None
        after = await _decisions(connection)
        return Step(
            name=name,
            rate=step_rate,
            connections=connections,
            result=result,
            allowed=after["allow"] - before["allow"],
            denied=after["deny"] - before["deny"],
            waits=watch.waits,
            samples=watch.samples,
            api_cpu_seconds=api_cpu,
            database_cpu_seconds=database_cpu,
        )

    await step("warm-up", names, rate, length=min(seconds, 2))
    steps = [
        await step("one at a time", names, None),
        await step(f"{rate}/s over {len(names):,} tenants", names, rate, watched=True),
    ]
    for hot_rate in hot_rates:
        found = await step(
            f"hot tenant {hot_rate}/s", hot, hot_rate, watched=True, errors_allowed=True
        )
        steps.append(found)
        if found.result.p99_ms > PACED_P99_MS or found.result.non_2xx:
            break
    await connection.execute(_SET_LIMITS, hot, DENY_ALL_LIMIT_USD)
    steps.append(
        await step(
            f"deny-heavy, hot tenant {rate}/s",
            hot,
            rate,
            watched=True,
            errors_allowed=True,
            length=max(seconds / 2, 1),
        )
    )
    return steps


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def steps_table(steps: Sequence[Step]) -> str:
    lines = [
        "| step | connections | asked/s | reached/s | p50 | p99 | max | allowed | denied "
        "| non-2xx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for step in steps:
        asked = "-" if step.rate is None else f"{step.rate:,}"
        lines.append(
            f"| {step.name} | {step.connections} | {asked} | {step.reached:,.0f} "
            f"| {_ms(step.result.p50_ms)} | {_ms(step.result.p99_ms)} | {_ms(step.result.max_ms)} "
            f"| {step.allowed:,} | {step.denied:,} | {step.result.non_2xx:,} |"
        )
    return "\n".join(lines)


def _met(p99_ms: float, goal_ms: float) -> str:
    return "met" if p99_ms < goal_ms else "NOT met"


def goal_lines(steps: Sequence[Step], *, rate: int, tenants: int) -> str:
    one, paced = steps[0], steps[1]
    hot = [step for step in steps if step.name.startswith("hot tenant")]
    kept_up = [
        step for step in hot if step.result.p99_ms <= PACED_P99_MS and not step.result.non_2xx
    ]
    if kept_up:
        best = max(kept_up, key=lambda step: (step.reached, step.rate or 0))
        ceiling = (
            f"{best.reached:,.0f} checks/s reached (asked {best.rate:,}/s, p99 "
            f"{_ms(best.result.p99_ms)})"
        )
        if len(kept_up) == len(hot):
            ceiling += "; every rate asked kept p99 <= 50 ms: the ceiling is higher"
    else:
        ceiling = "below the lowest rate asked"
    return (
        f"\ngoal: one at a time, p99 < {ONE_AT_A_TIME_P99_MS:.0f} ms: "
        f"{_met(one.result.p99_ms, ONE_AT_A_TIME_P99_MS)} ({_ms(one.result.p99_ms)})\n"
        f"goal: {rate}/s over {tenants:,} tenants, p99 < {PACED_P99_MS:.0f} ms: "
        f"{_met(paced.result.p99_ms, PACED_P99_MS)} ({_ms(paced.result.p99_ms)} at "
        f"{paced.reached:,.0f}/s reached)\n"
        f"hot tenant ceiling at p99 <= {PACED_P99_MS:.0f} ms: {ceiling}"
    )


def limit_lines(steps: Sequence[Step]) -> str:
    """Per watched step: the share of sampled active backends by wait event, and CPU seconds."""
    lines = ["\nwhat limits it (active backends by wait event, share of samples; CPU seconds):"]
    for step in steps:
        if not step.samples:
            continue
        total = sum(step.waits.values())
        shares = (
            ", ".join(f"{what} {count / total:.0%}" for what, count in step.waits.most_common(4))
            if total
            else "no active backend sampled"
        )
        database = (
            "n/a (backends not visible here)"
            if step.database_cpu_seconds is None
            else f"{step.database_cpu_seconds:.1f} s"
        )
        lines.append(
            f"- {step.name}: {shares} ({step.samples} samples); API {step.api_cpu_seconds:.1f} s, "
            f"PostgreSQL {database}"
        )
    return "\n".join(lines)
