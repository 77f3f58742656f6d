"""`llm-usage prices set|list|history|import`: the price table, its audit and the import of a
price list (LiteLLM's community JSON or a plain CSV).

Arguments are checked before the database is touched; a bad one, a refused row (nothing of its
command is added), a file that cannot be read and a database that cannot be reached or is not
migrated each end in one line and exit 2.

Every action is a sub-parser of `prices` whose defaults carry `price_action`, an
`async (settings, args, out) -> None`; `add_parser` registers this module's actions, then the
ones of `llm_usage.cli.price_checks` (drift, preview) through its `add_price_checks`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from llm_usage.cli.args import Commands, OneLineArgumentParser, checked_instant
from llm_usage.cli.budget_tables import aligned_table, budget_tables
from llm_usage.cli.policy import default_actor
from llm_usage.cli.price_checks import add_price_checks
from llm_usage.core.errors import ConfigurationError
from llm_usage.domain.money import canonical_decimal
from llm_usage.domain.prices import PRICE_CHANGE_LEAD, Price, in_effect, new_price

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings
    from llm_usage.storage.prices import PriceAddition

# What `prices` registers its actions in (and `llm_usage.cli.price_checks` its own).
PriceActions: TypeAlias = "argparse._SubParsersAction[OneLineArgumentParser]"

_TABLES = "price tables"
_HEADERS = [
    "PROVIDER",
    "MODEL",
    "EFFECTIVE_FROM",
    "INPUT",
    "CACHED_INPUT",
    "OUTPUT",
    "REASONING",
    "REQUEST_FEE_USD",
]
_AMOUNT_COLUMNS = {3, 4, 5, 6, 7}
_LEAD_MINUTES = int(PRICE_CHANGE_LEAD.total_seconds() // 60)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _decimal(flag: str, text: str | None) -> Decimal | None:
    """An exact price from its digits (never a float), within the event's decimal limits."""
    from pydantic_core import PydanticCustomError  # noqa: PLC0415 - when a command runs

    from llm_usage.schemas.usage_event import exact_decimal  # noqa: PLC0415

    if text is None:
        return None
    try:
        return exact_decimal(text)
    except PydanticCustomError as error:
        raise ConfigurationError(f"{flag} {error.message()}, not {text!r}") from None


def _actor(args: argparse.Namespace) -> str:
    return default_actor() if args.actor is None else args.actor


def _cells(price: Price) -> list[str]:
    return [
        price.provider,
        price.model,
        _utc(price.effective_from),
        *(
            canonical_decimal(amount)
            for amount in (
                price.input,
                price.cached_input,
                price.output,
                price.reasoning,
                price.request_fee_usd,
            )
        ),
    ]


def describe_price(price: Price | Mapping[str, Any]) -> str:
    """`openai/gpt-4o from 2026-11-01T00:00:00Z: input 2.5, cached 1.25, output 10, reasoning
    10, fee 0` (USD per million tokens; the fee per request)."""
    from llm_usage.storage.prices import price_json  # noqa: PLC0415

    row = price_json(price) if isinstance(price, Price) else price
    return (
        f"{row['provider']}/{row['model']} from {row['effective_from']}: input {row['input']}, "
        f"cached {row['cached_input']}, output {row['output']}, reasoning {row['reasoning']}, "
        f"fee {row['request_fee_usd']}"
    )


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _report(addition: PriceAddition, out: TextIO, *, dry_run: bool) -> None:
    """Each row added, then the counts: a list imported again is all unchanged rows, which
    are counted, not listed."""
    verb = "would add" if dry_run else "added"
    for price in addition.added:
        print(f"{verb} {describe_price(price)}", file=out)
    print(
        f"{verb} {_rows(len(addition.added))}; {_rows(len(addition.unchanged))} unchanged "
        "(already in the table as given)" + ("; dry run: nothing was changed" if dry_run else ""),
        file=out,
    )


async def prices_set(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.prices import add_prices  # noqa: PLC0415

    effective_from = checked_instant("--effective-from", args.effective_from)
    input_usd = _decimal("--input", args.input)
    output_usd = _decimal("--output", args.output)
    assert input_usd is not None  # a required argument
    assert output_usd is not None
    price = new_price(
        args.provider,
        args.model,
        # Without --effective-from the database's clock decides (earliest=True below): now for
        # a new pair, the lead from now for a change.
        effective_from or datetime.now(UTC),
        input=input_usd,
        output=output_usd,
        cached_input=_decimal("--cached-input", args.cached_input),
        reasoning=_decimal("--reasoning", args.reasoning),
        request_fee_usd=_decimal("--request-fee-usd", args.request_fee_usd),
    )
    async with budget_tables(settings, tables=_TABLES) as connection:
        addition = await add_prices(
            connection, [price], actor=_actor(args), earliest=effective_from is None
        )
    _report(addition, out, dry_run=False)


async def prices_list(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.prices import find_prices, price_json  # noqa: PLC0415

    at = checked_instant("--at", args.at)
    async with budget_tables(settings, tables=_TABLES) as connection:
        table = await find_prices(connection, provider=args.provider, model=args.model)
    if at is None:
        rows = [price for pair_rows in table.values() for price in pair_rows]
    else:
        rows = [price for pair_rows in table.values() if (price := in_effect(pair_rows, at))]
    if args.json:
        for price in rows:
            print(json.dumps(price_json(price)), file=out)
    elif not rows:
        print("no prices" + ("" if at is None else f" in effect at {_utc(at)}"), file=out)
    else:
        print(aligned_table(_HEADERS, [_cells(p) for p in rows], right=_AMOUNT_COLUMNS), file=out)


async def prices_history(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.storage.prices import price_history  # noqa: PLC0415

    async with budget_tables(settings, tables=_TABLES) as connection:
        changes = await price_history(connection, args.provider, args.model)
    if args.json:
        for change in changes:
            print(json.dumps(change.to_json()), file=out)
    elif not changes:
        print("no price changes", file=out)
    else:
        rows = [
            [
                _utc(change.changed_at),
                change.actor,
                describe_price(change.new_price),
                "-" if change.old_price is None else describe_price(change.old_price),
            ]
            for change in changes
        ]
        print(aligned_table(["CHANGED_AT", "ACTOR", "ADDED", "AFTER"], rows, right=set()), file=out)


async def prices_import(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.schemas.price_lists import PriceListError, read_price_file  # noqa: PLC0415
    from llm_usage.storage.prices import add_prices  # noqa: PLC0415

    effective_from = checked_instant("--effective-from", args.effective_from)
    path = Path(args.file)
    try:
        price_list = read_price_file(path, effective_from=effective_from)
    except PriceListError as error:
        where = "" if str(error).startswith(str(path)) else f"{path}: "
        raise ConfigurationError(f"{where}{error}") from None
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror or error}") from None
    async with budget_tables(settings, tables=_TABLES) as connection:
        addition = await add_prices(
            connection, price_list.prices, actor=_actor(args), dry_run=args.dry_run
        )
    _report(addition, out, dry_run=args.dry_run)
    for line in price_list.ignored:
        print(f"ignored: {line}", file=out)


async def run_prices_command(args: argparse.Namespace, settings: Settings) -> None:
    """`llm-usage prices <action>`, printing to stdout."""
    await args.price_action(settings, args, sys.stdout)


def _add_actor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--actor", metavar="NAME", help="who, for the audit [the OS user, else unknown]"
    )


def add_parser(commands: Commands) -> None:
    """`prices set|list|history|import` (and the checks of `llm_usage.cli.price_checks`): every
    mistake in their arguments is one line and exit 2."""
    prices = commands.add_parser(
        "prices", help="the price table: set, list, history, import a price list"
    )
    prices.set_defaults(run=run_prices_command)
    actions = prices.add_subparsers(
        dest="prices_command",
        required=True,
        metavar="ACTION",
        parser_class=OneLineArgumentParser,
    )
    add_price_table_actions(actions)
    add_price_checks(actions)


def add_price_table_actions(actions: PriceActions) -> None:
    """Register set, list, history and import under `prices`."""
    setting = actions.add_parser(
        "set",
        help="add a row: a pair's first row may start at any time, a change at least "
        f"{_LEAD_MINUTES} minutes from now",
    )
    setting.set_defaults(price_action=prices_set)
    setting.add_argument("--provider", required=True, metavar="NAME")
    setting.add_argument("--model", required=True, metavar="NAME")
    for flag, text in (
        ("--input", "USD per million input tokens (required)"),
        ("--output", "USD per million output tokens (required)"),
        ("--cached-input", "USD per million cached input tokens [the input price]"),
        ("--reasoning", "USD per million reasoning tokens [the output price]"),
        ("--request-fee-usd", "USD per request [0]"),
    ):
        required = flag in ("--input", "--output")
        setting.add_argument(flag, required=required, metavar="USD", help=text)
    setting.add_argument(
        "--effective-from",
        metavar="TIME",
        help="RFC 3339 with an offset [now for a new pair, "
        f"{_LEAD_MINUTES} minutes from now for a change]",
    )
    _add_actor(setting)

    listing = actions.add_parser("list", help="the table's rows, or the rows in effect at a time")
    listing.set_defaults(price_action=prices_list)
    listing.add_argument("--at", metavar="TIME", help="only the rows in effect then (RFC 3339)")

    history = actions.add_parser("history", help="the audit of rows added, newest first")
    history.set_defaults(price_action=prices_history)
    for parser in (listing, history):
        parser.add_argument("--provider", metavar="NAME")
        parser.add_argument("--model", metavar="NAME")
        parser.add_argument("--json", action="store_true", help="one JSON object a line")

    importing = actions.add_parser(
        "import",
        help="add the rows of a price list (LiteLLM's JSON or a CSV), all or nothing",
        description="Add the rows of LiteLLM's model_prices_and_context_window.json or of a "
        "CSV with a header provider,model,input,output and optionally cached_input, reasoning, "
        "request_fee_usd, effective_from (USD per million tokens; the fee per request). All "
        "rows are added or none; rows already in the table are left as they are.",
    )
    importing.set_defaults(price_action=prices_import)
    importing.add_argument("file", metavar="FILE", help=".json (LiteLLM's format) or .csv")
    importing.add_argument(
        "--effective-from",
        metavar="TIME",
        help="when the rows take effect (RFC 3339; required for JSON, the default of a CSV's "
        "empty effective_from cells)",
    )
    importing.add_argument(
        "--dry-run", action="store_true", help="say what would be added, change nothing"
    )
    _add_actor(importing)
