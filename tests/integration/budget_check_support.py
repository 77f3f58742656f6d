"""Budget checks' test support: real `serve api` processes on one port, and blocking policies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg

from llm_usage.api.server import LISTENING
from llm_usage.core.faults import FAULT_VARIABLE
from llm_usage.domain.budgets import Enforcement, ScopeType
from llm_usage.domain.policies import BudgetPolicy
from llm_usage.storage.budget_policies import set_policy
from llm_usage.testing.processes import free_port, spawn_llm_usage
from tests.api_support import AUDIENCE, SECRET
from tests.integration.pipeline import unique, wait_until

STARTS_WITHIN_SECONDS = 60.0


def _environment(database_url: str, port: int, **extra: str) -> dict[str, str]:
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("API_", "KAFKA_", "DATABASE_", "BUDGET_"))
        and name != FAULT_VARIABLE
    }
    return {
        **inherited,
        "DATABASE_URL": database_url,
        "DATABASE_POOL_SIZE": "8",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "API_JWT_SECRET": SECRET,
        "API_JWT_AUDIENCE": AUDIENCE,
        "LOG_FORMAT": "json",
        **extra,
    }


async def _listening(log_path: Path, process: asyncio.subprocess.Process) -> None:
    async def listening() -> bool:
        text = await asyncio.to_thread(log_path.read_text)
        assert process.returncode is None, text
        return any(
            line.startswith("{") and json.loads(line).get("event") == LISTENING
            for line in text.splitlines()
        )

    await wait_until(listening, within=STARTS_WITHIN_SECONDS, message=f"{log_path} listening")


@dataclass
class Api:
    url: str
    processes: list[asyncio.subprocess.Process]
    database_url: str
    port: int
    log_dir: Path

    async def start(self, count: int = 1, env: dict[str, str] | None = None) -> None:
        """`count` more `serve api` processes on this port (sharing it when more than one)."""
        if count > 1 or self.processes:
            env = {"API_REUSE_PORT": "true", **(env or {})}
        started = []
        for _ in range(count):
            log_path = self.log_dir / f"api-{unique('log')}.log"
            process = await spawn_llm_usage(
                "serve", "api",
                env=_environment(self.database_url, self.port, **(env or {})), log_path=log_path,
            )  # fmt: skip
            started.append((process, log_path))
        for process, log_path in started:
            await _listening(log_path, process)
            self.processes.append(process)

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
            await process.wait()
        self.processes.clear()


@contextlib.asynccontextmanager
async def serving(
    database_url: str, tmp_path: Path, count: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[Api]:
    port = free_port()
    api = Api(f"http://127.0.0.1:{port}", [], database_url, port, tmp_path)
    try:
        await api.start(count, env)
        yield api
    finally:
        await api.stop()


async def block_policy(
    pool: asyncpg.Pool,
    tenant: str,
    scope_type: ScopeType = ScopeType.TENANT,
    scope_id: str | None = None,
    *,
    daily: str | None = None,
    monthly: str | None = None,
) -> None:
    """A blocking policy, set as `policy set --enforcement block` sets it."""
    policy = BudgetPolicy(
        tenant,
        scope_type,
        scope_id or tenant,
        daily_limit_usd=Decimal(daily) if daily else None,
        monthly_limit_usd=Decimal(monthly) if monthly else None,
        enforcement=Enforcement.BLOCK,
    )
    async with pool.acquire() as connection:
        await set_policy(connection, policy, actor="test")
