"""`llm-usage serve api` as a real process: configured from the environment, probes and metrics,
one line for what a person got wrong, exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_usage.api.server import LISTENING
from tests.api_support import AUDIENCE, SECRET, bearer, token
from tests.integration.pipeline import unique


def _environment(database_url: str, **extra: str) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("API_", "KAFKA_", "DATABASE_"))
    }
    return {
        **environment,
        "DATABASE_URL": database_url,
        "API_HOST": "127.0.0.1",
        "API_PORT": "0",
        "API_JWT_AUDIENCE": AUDIENCE,
        "LOG_FORMAT": "json",
        **extra,
    }


async def _run(*args: str, environment: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", *args,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@contextlib.asynccontextmanager
async def _serving(
    database_url: str, **extra: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_usage", "serve", "api",
        env=_environment(database_url, API_JWT_SECRET=SECRET, **extra),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    port = None
    deadline = time.monotonic() + 60
    while port is None and time.monotonic() < deadline:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        assert line, "the API exited before it listened"
        if line.startswith(b"{") and json.loads(line).get("event") == LISTENING:
            port = json.loads(line)["port"]
    assert port is not None
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
async def server(
    database_url: str, pool: asyncpg.Pool
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    async with _serving(database_url) as served:
        yield served


async def test_it_serves_probes_metrics_and_v1_then_stops_on_sigterm(
    server: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, base = server
    tenant = unique("tenant")
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/healthz")).text == "ok\n"
        assert (await client.get("/readyz")).text == "ready\n"
        answer = await client.get(
            f"/v1/tenants/{tenant}/budgets", headers=bearer(token("tenant-member", tenant))
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"items": []}
        assert (await client.get(f"/v1/tenants/{tenant}/budgets")).status_code == 401
        assert (await client.get("/openapi.json")).json()["info"]["title"]
        metrics = (await client.get("/metrics")).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    route = "/v1/tenants/{tenant_id}/budgets"
    for status in ("200", "401"):
        labels = (("method", "GET"), ("route", route), ("status", status))
        assert samples[("llm_usage_api_requests_total", labels)] == 1, status
    assert (
        samples[
            ("llm_usage_api_request_duration_seconds_count", (("method", "GET"), ("route", route)))
        ]
        == 2
    )

    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 30) == 0


@contextlib.asynccontextmanager
async def _connection(
    base: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """One TCP connection to the API, for requests that must share it."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()


async def _healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive `GET /healthz` on an open connection: its body, or b"" if it was closed."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except asyncio.IncompleteReadError:
        return b""
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def test_an_idle_connection_outlives_the_clients_idle_timeouts(
    server: tuple[asyncio.subprocess.Process, str],
) -> None:
    """A gateway's pool (httpx 5 s, Go 90 s) reuses a connection idle for longer than uvicorn's
    own 5 s: the server must not be the side that closes it, or a request sent as it closes is
    lost. The same connection answers after 6 s idle; and an idle connection does not hold up
    a stop: SIGTERM closes it and the process ends."""
    process, base = server
    async with _connection(base) as (reader, writer):
        assert await _healthz(reader, writer) == b"ok\n"
        await asyncio.sleep(6)
        assert await _healthz(reader, writer) == b"ok\n"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_api_keep_alive_seconds_closes_idle_connections(database_url: str) -> None:
    async with (
        _serving(database_url, API_KEEP_ALIVE_SECONDS="1") as (_, base),
        _connection(base) as (reader, writer),
    ):
        assert await _healthz(reader, writer) == b"ok\n"
        await asyncio.sleep(0.3)
        assert await _healthz(reader, writer) == b"ok\n"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after 1 s idle


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "no key to check API tokens with"),
        ({"API_JWT_SECRET": "short"}, "needs at least 32"),
        ({"API_JWT_JWKS_FILE": "/nonexistent.json"}, "API_JWT_JWKS_FILE"),
        ({"API_JWT_SECRET": SECRET, "API_PORT": "70000"}, "API_PORT"),
        ({"API_JWT_SECRET": SECRET, "API_HOST": "no-such-host.invalid"}, "API_HOST"),
    ],
)
async def test_configuration_mistakes_end_in_one_line(
    database_url: str, extra: dict[str, str], message: str
) -> None:
    code, stderr = await _run("serve", "api", environment=_environment(database_url, **extra))
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


async def test_a_taken_port_ends_in_one_line(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = await _run(
            "serve", "api",
            environment=_environment(database_url, API_JWT_SECRET=SECRET, API_PORT=str(port)),
        )  # fmt: skip
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


async def test_an_unreachable_database_ends_in_one_line() -> None:
    environment = _environment("postgresql://nobody@127.0.0.1:1/none", API_JWT_SECRET=SECRET)
    code, stderr = await _run("serve", "api", environment=environment)
    assert code == 2
    assert "cannot reach PostgreSQL" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
