"""`make run` (the `llm-usage demo` command) against the session's Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import sys


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
