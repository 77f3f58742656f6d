"""`llm-usage prices set|list|history` on a real PostgreSQL: rows added at the database's
clock, listed as they are or as in effect at a time, every addition audited, and every mistake
one line and exit 2 with nothing added."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llm_usage.domain.prices import PRICE_CHANGE_LEAD
from llm_usage.storage.prices import find_prices, price_history
from tests import clock
from tests.integration.pipeline import unique
from tests.integration.test_policies import llm_usage
from tests.integration.test_prices_storage import db_now


def listed(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


async def test_set_list_and_history(database_url: str, pool: asyncpg.Pool) -> None:
    provider = unique("openai")
    pair = ("--provider", provider, "--model", "gpt-4o")
    before = await db_now(pool)

    first = await llm_usage(
        database_url,
        *("prices", "set", *pair, "--input", "2.50", "--output", "1E+1"),
        *("--cached-input", "1.25", "--actor", "alice"),
    )
    assert first.code == 0, first
    assert f"added {provider}/gpt-4o from " in first.out
    assert "input 2.5, cached 1.25, output 10, reasoning 10, fee 0" in first.out

    # A change without --effective-from starts the lead from the database's now.
    change = await llm_usage(
        database_url,
        *("prices", "set", *pair, "--input", "3", "--output", "12", "--actor", "bob"),
    )
    assert change.code == 0, change
    after = await db_now(pool)

    rows = listed(
        (await llm_usage(database_url, "prices", "list", "--provider", provider, "--json")).out
    )
    assert [(r["input"], r["cached_input"], r["output"]) for r in rows] == [
        ("2.5", "1.25", "10"),
        ("3", "3", "12"),
    ]
    started = [datetime.fromisoformat(r["effective_from"]) for r in rows]
    assert before <= started[0] <= after
    assert before + PRICE_CHANGE_LEAD <= started[1] <= after + PRICE_CHANGE_LEAD

    now = clock.iso(after)
    in_effect = await llm_usage(
        database_url, "prices", "list", "--provider", provider, "--at", now, "--json"
    )
    assert [r["input"] for r in listed(in_effect.out)] == ["2.5"]
    later = clock.iso(after + PRICE_CHANGE_LEAD + timedelta(minutes=1))
    in_effect_later = await llm_usage(
        database_url, "prices", "list", "--provider", provider, "--at", later, "--json"
    )
    assert [r["input"] for r in listed(in_effect_later.out)] == ["3"]
    earlier = clock.iso(before - timedelta(days=1))
    none_yet = await llm_usage(
        database_url, "prices", "list", "--provider", provider, "--at", earlier
    )
    assert none_yet.out.startswith("no prices in effect at "), none_yet

    table = await llm_usage(database_url, "prices", "list", "--provider", provider)
    assert table.out.splitlines()[0].split() == [
        "PROVIDER",
        "MODEL",
        "EFFECTIVE_FROM",
        "INPUT",
        "CACHED_INPUT",
        "OUTPUT",
        "REASONING",
        "REQUEST_FEE_USD",
    ]
    assert len(table.out.splitlines()) == 3

    history = await llm_usage(database_url, "prices", "history", "--provider", provider, "--json")
    entries = listed(history.out)
    assert [(e["actor"], e["new_price"]["input"]) for e in entries] == [
        ("bob", "3"),
        ("alice", "2.5"),
    ]
    assert entries[0]["old_price"] == entries[1]["new_price"]
    assert entries[1]["old_price"] is None


async def test_a_refused_change_is_one_line_and_adds_nothing(
    database_url: str, pool: asyncpg.Pool
) -> None:
    provider = unique("anthropic")
    pair = ("--provider", provider, "--model", "claude")
    backdated = clock.iso(await db_now(pool) - timedelta(days=3))
    created = await llm_usage(
        database_url,
        *("prices", "set", *pair, "--input", "3", "--output", "15"),
        *("--effective-from", backdated),
    )
    assert created.code == 0, created
    in_the_past = clock.iso(await db_now(pool) - timedelta(hours=1))
    refused = await llm_usage(
        database_url,
        *("prices", "set", *pair, "--input", "4", "--output", "15"),
        *("--effective-from", in_the_past),
    )
    assert refused.code == 2, refused
    assert re.fullmatch(
        rf"llm-usage: error: {provider}/claude already has prices: a change must take effect "
        r"at least 10 minutes from now .+\n",
        refused.err,
    ), refused
    async with pool.acquire() as connection:
        rows = (await find_prices(connection, provider=provider))[(provider, "claude")]
    assert [row.input for row in rows] == [Decimal(3)]


async def test_import_adds_a_list_all_or_nothing_and_again_changes_nothing(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    provider = unique("imported")
    csv_file = tmp_path / "prices.csv"
    csv_file.write_text(
        "provider,model,input,output,cached_input,notes\n"
        f"{provider},m1,2.5,10,1.25,flagship\n"
        f"{provider},m2,1.5e-1,0.6,,\n",
        encoding="utf-8",
    )
    backdated = clock.iso(await db_now(pool) - timedelta(days=7))
    command = ("prices", "import", str(csv_file), "--effective-from", backdated)

    dry = await llm_usage(database_url, *command, "--dry-run")
    assert dry.code == 0, dry
    assert dry.out.splitlines()[-2:] == [
        "would add 2 rows; 0 rows unchanged (already in the table as given); dry run: nothing "
        "was changed",
        "ignored: columns ignored: notes",
    ]
    async with pool.acquire() as connection:
        assert await find_prices(connection, provider=provider) == {}

    imported = await llm_usage(database_url, *command, "--actor", "importer")
    assert imported.code == 0, imported
    assert f"added {provider}/m2 from " in imported.out
    assert "input 0.15, cached 0.15, output 0.6, reasoning 0.6, fee 0" in imported.out
    again = await llm_usage(database_url, *command)
    assert again.code == 0, again
    assert "added 0 rows; 2 rows unchanged" in again.out

    # A list whose one row would change a pair without the lead adds nothing at all.
    csv_file.write_text(
        f"provider,model,input,output\n{provider},m3,1,2\n{provider},m1,3,12\n", encoding="utf-8"
    )
    now = clock.iso(await db_now(pool))
    refused = await llm_usage(
        database_url, "prices", "import", str(csv_file), "--effective-from", now
    )
    assert refused.code == 2, refused
    assert f"{provider}/m1 already has prices" in refused.err
    async with pool.acquire() as connection:
        assert set(await find_prices(connection, provider=provider)) == {
            (provider, "m1"),
            (provider, "m2"),
        }
        history = await price_history(connection, provider)
    assert [change.actor for change in history] == ["importer", "importer"]


async def test_import_of_a_file_it_cannot_use_is_one_line(
    database_url: str, tmp_path: Path
) -> None:
    litellm = tmp_path / "model_prices_and_context_window.json"
    litellm.write_text('{"m": {"litellm_provider": "p", "input_cost_per_token": 1e-6}}')
    for args, fragment in (
        ((str(litellm),), "carries no dates"),
        ((str(tmp_path / "absent.csv"),), "cannot read"),
    ):
        finished = await llm_usage(database_url, "prices", "import", *args)
        assert finished.code == 2, finished
        assert re.fullmatch(r"llm-usage: error: .+\n", finished.err), finished
        assert fragment in finished.err, finished


_SET = ("prices", "set", "--provider", "p-args", "--model", "m")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((*_SET, "--input", "1", "--output", "-2"), "--output must be at least 0"),
        ((*_SET, "--input", "1,5", "--output", "2"), "--input must be a number written in digits"),
        ((*_SET, "--input", "NaN", "--output", "2"), "--input must be a number"),
        ((*_SET, "--input", "1", "--output", "2", "--cached-input", "1.0000000000000000001"),
         "--cached-input at most 18 digits after"),
        ((*_SET, "--input", "1", "--output", "2", "--effective-from", "2026-13-01T00:00:00"),
         "--effective-from must be an RFC 3339 time"),
        ((*_SET, "--input", "1"), "the following arguments are required: --output"),
        (("prices", "list", "--at", "tomorrow"), "--at must be an RFC 3339 time"),
    ],
)  # fmt: skip
async def test_each_bad_argument_is_one_line_and_exit_2(
    database_url: str, pool: asyncpg.Pool, args: tuple[str, ...], fragment: str
) -> None:
    finished = await llm_usage(database_url, *args)
    assert finished.code == 2, finished
    assert re.fullmatch(r"llm-usage: error: .+\n", finished.err), finished
    assert fragment in finished.err, finished
    assert finished.out == ""
    async with pool.acquire() as connection:
        assert await find_prices(connection, provider="p-args") == {}


async def test_an_unmigrated_database_is_one_line_naming_migrate(empty_database_url: str) -> None:
    finished = await llm_usage(empty_database_url, "prices", "list")
    assert finished.code == 2, finished
    assert finished.err == (
        "llm-usage: error: the database has no price tables yet; run `llm-usage migrate` first\n"
    )
