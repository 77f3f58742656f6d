"""The gateway team's Go example (docs/examples/go, franz-go) publishes events the consumer stores.

It is built with the Go toolchain from the committed go.mod and go.sum (read-only: a go.sum that
lacks an entry fails the build). Modules and build outputs are cached under the project's cache
directory, so only the first build on a machine downloads and compiles franz-go.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from llm_usage.local.paths import cache_dir
from tests.integration.interop import consume_until_idle, dead_letter_ends, exact_sum
from tests.integration.pipeline import (
    PipelineTopics,
    stored_for,
    tenant_totals,
    unique,
)
from tests.unavailable import service_unavailable

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "go"
PUBLISHED = re.compile(
    r"^published (?P<id>\S+) to (?P<topic>\S+) partition (?P<partition>\d+) offset \d+ "
    r"\((?P<compression>\w+), charge (?P<charge>\S+) USD\)$"
)
# 12 digits before the point and 18 after: the most the contract allows; no float holds it.
LARGEST_CHARGE = "987654321012.123456789123456789"
# The first build downloads franz-go and its compression libraries and compiles them.
BUILD_SECONDS = 900


@dataclass(frozen=True)
class Published:
    gateway_request_id: str
    compression: str
    charge: Decimal


def go_environment() -> dict[str, str]:
    cache = cache_dir() / "go"
    return {**os.environ, "GOMODCACHE": str(cache / "mod"), "GOCACHE": str(cache / "build")}


def build_example(directory: Path, package: str, binary: Path) -> Path:
    """`go build` of `package` (relative to the module) into `binary`, from the committed go.sum."""
    go = shutil.which("go")
    if go is None:
        service_unavailable("no Go toolchain (`go`) on PATH: install Go 1.26 or newer")
    try:
        built = subprocess.run(
            [go, "build", "-buildvcs=false", "-o", str(binary), package],
            cwd=directory,
            env=go_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`go build` of {directory / package} took longer than {BUILD_SECONDS} s")
    assert built.returncode == 0, built.stdout + built.stderr
    return binary


@pytest.fixture(scope="module")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example, built once for this module's tests."""
    return build_example(
        EXAMPLE, ".", tmp_path_factory.mktemp("go-example") / "publish-usage-event"
    )


async def run_example(binary: Path, *args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(binary),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 150)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{binary.name} {' '.join(args)} did not finish in 150 s") from None
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.timeout(BUILD_SECONDS + 300)
async def test_go_example_publishes_events_that_are_stored_with_the_exact_charge(
    go_example: Path, topics: PipelineTopics, pool: asyncpg.Pool
) -> None:
    tenant = unique("tenant")
    # Broker and topic from the environment, as the page shows it run after `dev env`.
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": topics.settings.kafka_bootstrap_servers,
        "USAGE_TOPIC": topics.usage,
    }
    flags = ["-brokers", topics.settings.kafka_bootstrap_servers, "-topic", topics.usage]
    runs = [
        ["-tenant", tenant],  # the defaults: zstd, 0.000432
        [*flags, "-tenant", tenant, "-compression", "snappy", "-charge", "0.0054"],
        [*flags, "-tenant", tenant, "-compression", "lz4", "-charge", LARGEST_CHARGE],
        [*flags, "-tenant", tenant, "-compression", "gzip", "-charge", "0.000000000000000001"],
        [*flags, "-tenant", tenant, "-compression", "none", "-charge", "0.005"],
    ]
    published: list[Published] = []
    for args in runs:
        code, output = await run_example(go_example, *args, env=env)
        assert code == 0, output
        match = PUBLISHED.search(output.strip())
        assert match is not None, output
        assert match["topic"] == topics.usage
        published.append(Published(match["id"], match["compression"], Decimal(match["charge"])))
    assert [p.compression for p in published] == ["zstd", "snappy", "lz4", "gzip", "none"]
    assert published[2].charge == Decimal(LARGEST_CHARGE)

    dead_before = await dead_letter_ends(topics)
    stopped = await consume_until_idle(topics)
    assert stopped.get("recorded") == len(published), stopped

    rows = {
        row["gateway_request_id"]: row
        for row in await stored_for(pool, [p.gateway_request_id for p in published])
    }
    assert set(rows) == {p.gateway_request_id for p in published}
    for event in published:
        row = rows[event.gateway_request_id]
        assert row["tenant_id"] == tenant
        assert row["customer_charge_usd"] == event.charge
    # The example's own half-up rounding to cents, done with math/big.
    cents = [rows[p.gateway_request_id]["customer_charge_cents"] for p in published]
    assert cents == [0, 1, 98765432101212, 0, 1]
    assert await tenant_totals(pool, tenant) == (
        len(published),
        exact_sum(p.charge for p in published),
    )
    assert await dead_letter_ends(topics) == dead_before


@pytest.mark.timeout(BUILD_SECONDS + 60)
@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["-compression", "brotli"], 'unknown compression "brotli"'),
        (["-charge", "1e-3"], "is not a plain non-negative decimal"),
        (["-charge", "-0.5"], "is not a plain non-negative decimal"),
    ],
)
async def test_go_example_refuses_bad_settings_in_one_line(
    go_example: Path, args: list[str], complaint: str
) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    code, output = await run_example(go_example, *args, env=env)
    assert code == 1
    assert output.count("\n") == 1, output
    assert output.startswith("error: "), output
    assert complaint in output, output
