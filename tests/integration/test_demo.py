"""`make run` (the `llm-usage demo` command): against the session's Kafka and PostgreSQL, and
on its own local services on a machine where 9092 and 5432 are taken."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections import defaultdict
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
    """Each invoice line is the exact sum of what the run's events count for now (the voided
    one nothing, the amended one its new charge), rounded once half up, and there is one line
    for every (tenant, deployment) of the run; the corrected events' rows are kept as stored,
    and reconcile read the run's events."""
    [run_id] = re.findall(
        r"^== What landed in llm_usage_events \(demo run ([0-9a-f]{8})\)", output, re.M
    )
    connection = await asyncpg.connect(database_url)
    try:
        effective = await connection.fetch(
            """
            SELECT tenant_id, deployment_id, sum(customer_charge_usd) AS exact
            FROM llm_usage_events_effective
            WHERE gateway_request_id LIKE $1 AND NOT voided
            GROUP BY tenant_id, deployment_id
            """,
            f"demo-{run_id}-%",
        )
        stored = await connection.fetch(
            """
            SELECT tenant_id, deployment_id, gateway_request_id, customer_charge_usd
            FROM llm_usage_events WHERE gateway_request_id LIKE $1
            """,
            f"demo-{run_id}-%",
        )
    finally:
        await connection.close()
    expected = {
        (row["tenant_id"], row["deployment_id"] or "(none)"): Decimal(row["exact"])
        for row in effective
    }
    lines = invoice_lines(output)
    assert set(lines) == set(expected), output
    for key, (exact, amount) in lines.items():
        assert exact == expected[key], (key, output)
        assert amount == round_half_up(expected[key], 2), (key, output)

    # The corrections moved the lines of their events by exactly their difference, and the
    # original rows are untouched.
    rows = {row["gateway_request_id"]: row for row in stored}
    as_stored: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for row in stored:
        as_stored[row["tenant_id"], row["deployment_id"] or "(none)"] += row["customer_charge_usd"]
    moved: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for _, request_id, tenant, before, after in corrections(output):
        row = rows[request_id]
        assert (row["tenant_id"], row["customer_charge_usd"]) == (tenant, before), output
        moved[tenant, row["deployment_id"] or "(none)"] += before - after
    assert sum(moved.values()) > 0
    for key, (exact, _) in lines.items():
        assert exact == as_stored[key] - moved[key], (key, output)

    [(_, events)] = reconciled(output)
    # The one pass reads the run's stored events (the voided one counts for nothing).
    assert len(stored) - 1 <= events <= len(stored), output


def corrections(output: str) -> list[tuple[str, str, str, Decimal, Decimal]]:
    """The printed corrections: (action, event id, tenant, charge before, charge after)."""
    return [
        (
            match["action"],
            match["id"],
            match["tenant"],
            Decimal(match["before"]),
            Decimal(0) if match["voided"] else Decimal(match["after"]),
        )
        for match in re.finditer(
            r"^  (?P<action>void|amend)\s+(?P<id>demo-[0-9a-f]{8}-\d{8})  "
            r"(?P<tenant>initech-[0-9a-f]{8})  charge (?P<before>\d+\.\d+) -> "
            r"(?:(?P<voided>0 \(voided\))|(?P<after>\d+\.\d+))  'demo: [^']+'$",
            output,
            re.MULTILINE,
        )
    ]


def reconciled(output: str) -> list[tuple[int, int]]:
    """The printed reconcile summaries: (drifts, events read)."""
    return [
        (int(drifts), int(events))
        for drifts, events in re.findall(
            r"^  reconcile \d{4}-\d\d: (\d+) drift\(s\)(?: \([^)]*\))?; (\d+) events in ",
            output,
            re.MULTILINE,
        )
    ]


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
    assert_corrections_and_reconcile(output)


def assert_corrections_and_reconcile(output: str) -> None:
    """A void and an amend (to half the charge) of two stored events, applied, before the
    invoice lines; then reconcile, with no drift."""
    done = corrections(output)
    assert [action for action, *_ in done] == ["void", "amend"], output
    [(_, voided, _, before, after), (_, amended, _, amended_before, amended_after)] = done
    assert voided != amended
    assert before > 0
    assert after == 0
    assert amended_before > 0
    assert amended_after == amended_before / 2
    assert output.index("== Corrections") < output.index("== Invoice lines")
    assert "row stays in llm_usage_events as stored" in output
    [(drifts, events)] = reconciled(output)
    assert (drifts, events > 0) == (0, True), output
    assert output.index("== Invoice lines") < output.index("== Reconcile")


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
