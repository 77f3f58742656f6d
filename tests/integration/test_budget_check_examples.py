"""The gateway team's budget-check examples (docs/examples/check_budget.py and
docs/examples/go/budgetcheck) against a real `serve api`: allow, then deny once the limit is full,
then a repeat of the first id answering the same; and each fallback against a port where nothing
listens."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from llm_usage.testing.processes import free_port
from tests.api_support import token
from tests.integration.budget_check_support import block_policy, serving
from tests.integration.pipeline import unique
from tests.integration.test_go_example import EXAMPLE, build_example

PYTHON_EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "check_budget.py"


@dataclass(frozen=True)
class Example:
    """A command line from (flag name, value) pairs: `--name value` for Python, `-name=value`
    for Go; a value of None is a switch."""

    command: Callable[[list[tuple[str, str | None]]], list[str]]
    timeout: str  # half a second, as the example's -timeout reads it


@pytest.fixture(scope="module")
def go_budgetcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("go-budgetcheck") / "budgetcheck"
    return build_example(EXAMPLE, "./budgetcheck", binary)


@pytest.fixture(params=["python", "go"])
def example(request: pytest.FixtureRequest) -> Example:
    if request.param == "python":
        return Example(
            lambda flags: [
                sys.executable, str(PYTHON_EXAMPLE),
                *(part for name, value in flags for part in (f"--{name}", value) if part),
            ],
            "0.5",
        )  # fmt: skip
    binary = request.getfixturevalue("go_budgetcheck")
    return Example(
        lambda flags: [
            str(binary),
            *(f"-{name}" if value is None else f"-{name}={value}" for name, value in flags),
        ],
        "500ms",
    )


async def run(command: list[str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    assert not stderr, stderr.decode()
    return process.returncode, stdout.decode().strip()


async def test_allow_then_deny_then_a_repeat_answers_the_same(
    example: Example, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    await block_policy(pool, tenant, daily="1")
    first, second = unique("req"), unique("req")
    async with serving(database_url, tmp_path) as api:
        common = [("url", api.url), ("token", token("gateway")), ("tenant", tenant)]

        def check(request_id: str, charge: str) -> list[str]:
            return example.command(
                [*common, ("id", request_id), ("charge", charge), ("user", "u-1")]
            )

        allowed = await run(check(first, "0.6"))
        denied = await run(check(second, "0.6"))
        repeated = await run(check(first, "0.6"))
        refused = await run(check(unique("req"), "-1"))
    code, line = allowed
    assert code == 0
    assert line.startswith(f"allow {first}: held 0.6 USD until ")
    assert denied == (
        1,
        f"deny {second}: 0.6 USD over tenant {tenant} daily limit 1 USD (spend 0, held 0.6)",
    )
    assert repeated == allowed
    assert refused[0] == 2
    assert refused[1].startswith("refused ")
    assert "422" in refused[1]


@pytest.mark.parametrize(
    ("fallback", "code", "decision"), [("fail-open", 0, "allow"), ("fail-closed", 1, "deny")]
)
async def test_an_unreachable_check_falls_back_as_told(
    example: Example, fallback: str, code: int, decision: str
) -> None:
    request_id = unique("req")
    flags = [
        ("url", f"http://127.0.0.1:{free_port()}"), ("token", token("gateway")),
        ("tenant", "t"), ("charge", "1"), ("id", request_id), ("timeout", example.timeout),
        (fallback, None),
    ]  # fmt: skip
    exit_code, line = await run(example.command(flags))
    assert exit_code == code, line
    assert line.startswith(f"{decision} {request_id}: budget check unavailable (")
    assert line.endswith(f"); failing {fallback.removeprefix('fail-')}")
