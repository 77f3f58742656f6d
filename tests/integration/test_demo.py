"""`make run` (the `llm-usage demo` command): against the session's Kafka and PostgreSQL, and
on its own local services on a machine where 9092 and 5432 are taken."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from decimal import Decimal

import asyncpg
import httpx

from llm_usage.core.errors import LocalServiceError
from llm_usage.domain.money import round_half_up
from llm_usage.local.kafka import ensure_kafka_jars
from tests.integration.local_state import local_state, occupied, wait_until_gone
from tests.unavailable import service_unavailable


async def test_demo_shows_every_worker_and_serves_the_page_until_sigint(
    kafka_bootstrap_servers: str, database_url: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        "demo",
        "--open",
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers,
            "DATABASE_URL": database_url,
            "API_PORT": "0",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = ""
    try:
        output = await asyncio.wait_for(_read_until(process.stdout, SERVING), 180)
        assert_demo_summary(output)
        await _assert_lines_are_the_streams_exact_sums(output, database_url)

        [url] = re.findall(
            r"^  (http://127\.0\.0\.1:\d+/ui/tenants/acme-[0-9a-f]{8})$", output, re.M
        )
        [token] = re.findall(r'curl -H "Authorization: Bearer ([\w.-]+)" ', output)
        async with httpx.AsyncClient(timeout=30) as client:
            page = await client.get(url, headers={"Authorization": f"Bearer {token}"})
            assert page.status_code == 200, page.text
            assert url.rsplit("/", 1)[1] in page.text
            assert (await client.get(url)).status_code == 401
            signed_in = await client.get(f"{url}?token={token}")
            assert signed_in.status_code == 303
            assert (await client.get(url)).status_code == 200  # with the cookie it set
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
    rest, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output + rest.decode()
    assert rest.decode().strip() == "Stopped serving the API."


SERVING = "  Serving the API here until Ctrl-C."


async def _read_until(stream: asyncio.StreamReader, last_line: str) -> str:
    lines: list[str] = []
    while True:
        line = (await stream.readline()).decode()
        assert line, "the demo ended before it served the page:\n" + "".join(lines)
        lines.append(line)
        if line.rstrip("\n") == last_line:
            return "".join(lines)


async def _assert_lines_are_the_streams_exact_sums(output: str, database_url: str) -> None:
    """Each invoice line is the exact sum of what the run stored for it, rounded once half up,
    and there is one line for every (tenant, deployment) of the run."""
    [run_id] = re.findall(
        r"^== What landed in llm_usage_events \(demo run ([0-9a-f]{8})\)", output, re.M
    )
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            """
            SELECT tenant_id, deployment_id, sum(customer_charge_usd) AS exact
            FROM llm_usage_events WHERE gateway_request_id LIKE $1
            GROUP BY tenant_id, deployment_id
            """,
            f"demo-{run_id}-%",
        )
    finally:
        await connection.close()
    expected = {
        (row["tenant_id"], row["deployment_id"] or "(none)"): Decimal(row["exact"]) for row in rows
    }
    lines = invoice_lines(output)
    assert set(lines) == set(expected), output
    for key, (exact, amount) in lines.items():
        assert exact == expected[key], (key, output)
        assert amount == round_half_up(expected[key], 2), (key, output)


def invoice_lines(output: str) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    """The printed invoice lines: (tenant, deployment) -> (exact USD of the stream, amount)."""
    return {
        (match["tenant"], match["deployment"]): (
            Decimal(match["exact"]),
            Decimal(match["amount"].replace(",", "")),
        )
        for match in re.finditer(
            r"^  (?P<tenant>(?:acme|globex|initech)-[0-9a-f]{8})\s+(?P<deployment>\S+)\s+"
            r"(?P<requests>\d+)\s+(?P<tokens>\d+)\s+(?P<exact>\d+\.\d+)\s+"
            r"\$(?P<amount>[\d,]+\.\d\d)$",
            output,
            re.MULTILINE,
        )
    }


def assert_alerts(output: str) -> None:
    """Both policies' warning and exceeded alerts, each printed once, at or past its threshold."""
    alerts = re.findall(
        r"^  alert  (\w+)\s+(\S+)  (\w+) (\S+)  (\w+) from (\S+)  at (\d+) %: "
        r"spend (\S+) / limit (\S+) USD$",
        output,
        re.MULTILINE,
    )
    seen = [
        (level, tenant.rsplit("-", 1)[0], scope, window)
        for level, tenant, scope, _, window, *_ in alerts
    ]
    assert sorted(seen) == sorted(
        (level, tenant, scope, window)
        for level in ("warning", "exceeded")
        for tenant, scope, window in (("acme", "tenant", "monthly"), ("globex", "user", "daily"))
    ), output
    for level, *_, pct, spend, limit in alerts:
        assert int(pct) == (80 if level == "warning" else 100)
        assert Decimal(spend) >= Decimal(limit) * int(pct) / 100


def assert_demo_summary(output: str) -> None:
    """The demo's closing table: every published event stored once, dropped as a duplicate, or
    (the one malformed event) dead-lettered."""
    assert "Traceback" not in output
    assert re.search(r"dead letter: key=b'acme-[0-9a-f]{8}' reason=invalid_json", output)
    rows = {
        match["tenant"]: match
        for match in re.finditer(
            r"^  (?P<tenant>(?:acme|globex|initech)-[0-9a-f]{8})\s+(?P<published>\d+)\s+"
            r"(?P<stored>\d+)\s+"
            r"(?P<dups>\d+)\s+(?P<dead>\d+)\s+(?P<charge>\d+\.\d+)\s+\$(?P<billed>[\d,]+\.\d\d)$",
            output,
            re.MULTILINE,
        )
    }
    assert {tenant.rsplit("-", 1)[0] for tenant in rows} == {"acme", "globex", "initech"}, output
    for row in rows.values():
        assert int(row["published"]) == int(row["stored"]) + int(row["dups"])
    assert [int(row["dead"]) for _, row in sorted(rows.items())] == [1, 0, 0]
    assert sum(int(row["published"]) for row in rows.values()) == 600
    assert sum(int(row["dups"]) for row in rows.values()) > 0
    assert "llm-usage consume usage" in output
    assert_alerts(output)
    lines = invoice_lines(output)
    assert {tenant.rsplit("-", 1)[0] for tenant, _ in lines} == {"acme", "globex", "initech"}


def test_make_run_works_when_9092_and_5432_are_taken_and_says_where_it_runs() -> None:
    """A developer with their own Kafka on 9092 (and PostgreSQL on 5432) runs `make run`."""
    try:
        ensure_kafka_jars()  # the usual cache: only the state dir is the test's own
    except LocalServiceError as error:
        service_unavailable(f"cannot run a local Kafka: {error}")
    # A port something else already holds proves the point as well as one held here.
    with local_state() as state, occupied(9092), occupied(5432):
        finished = state.run("demo", timeout=240)

        assert finished.returncode == 0, finished
        lines = finished.stdout.splitlines()
        [kafka_line] = [line for line in lines if line.startswith("Kafka ")]
        assert re.fullmatch(
            r"Kafka listens on 127\.0\.0\.1:(?!9092\b)\d+ \(port 909[23] is taken by another "
            r"process; --kafka-port chooses one\)",
            kafka_line,
        ), kafka_line
        assert (
            f"PostgreSQL listens on a Unix socket in {state.path / 'postgres'} and on no TCP port "
            "(a server on 5432 does not matter)"
        ) in lines
        assert_demo_summary(finished.stdout)
        assert "Traceback" not in finished.stderr

        down = state.run("dev", "down")
        assert down.returncode == 0, down
        assert wait_until_gone(state) == {}
