"""`make run` (the `llm-usage demo` command): against the session's Kafka and PostgreSQL, and
on its own local services on a machine where 9092 and 5432 are taken."""

from __future__ import annotations

import asyncio
import os
import re
import sys

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.kafka import ensure_kafka_jars
from tests.integration.local_state import local_state, occupied, wait_until_gone
from tests.unavailable import service_unavailable


async def test_demo_prints_what_landed_per_tenant(
    kafka_bootstrap_servers: str, database_url: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_usage",
        "demo",
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers,
            "DATABASE_URL": database_url,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    raw, _ = await asyncio.wait_for(process.communicate(), 180)
    output = raw.decode()
    assert process.returncode == 0, output
    assert_demo_summary(output)


def assert_demo_summary(output: str) -> None:
    """The demo's closing table: every published event stored once, dropped as a duplicate, or
    (the one malformed event) dead-lettered."""
    assert "Traceback" not in output
    assert "dead letter: key=b'acme' reason=invalid_json" in output
    rows = {
        match["tenant"]: match
        for match in re.finditer(
            r"^(?P<tenant>acme|globex|initech)\s+(?P<published>\d+)\s+(?P<stored>\d+)\s+"
            r"(?P<dups>\d+)\s+(?P<dead>\d+)\s+(?P<charge>\d+\.\d+)\s+\$(?P<billed>[\d,]+\.\d\d)$",
            output,
            re.MULTILINE,
        )
    }
    assert set(rows) == {"acme", "globex", "initech"}, output
    for row in rows.values():
        assert int(row["published"]) == int(row["stored"]) + int(row["dups"])
    assert int(rows["acme"]["dead"]) == 1
    assert sum(int(row["published"]) for row in rows.values()) == 600
    assert sum(int(row["dups"]) for row in rows.values()) > 0
    assert "llm-usage consume usage" in output


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
