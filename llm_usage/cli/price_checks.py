"""`llm-usage prices drift` and `llm-usage prices preview`: the gateway's upstream costs checked
against the price table, and a month's invoice lines under today's table. Both only read: one
read-only transaction each.

`drift` exits 0 whether or not it finds drift, and 2 on an error a person can fix, like every
other command: a finding is the gateway's to fix, and the alert on
`llm_usage_price_drift_events_total` is what pages (docs/price-checks.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, time
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, TextIO

from llm_usage.cli.args import checked_period, checked_tenant
from llm_usage.cli.budget_tables import aligned_table
from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import ServiceUnreachableError, UserFacingError
from llm_usage.domain.money import canonical_decimal, cents_to_usd
from llm_usage.domain.periods import next_month, parse_period
from llm_usage.domain.price_drift import DEFAULT_TOLERANCE

if TYPE_CHECKING:
    from llm_usage.cli.prices import PriceActions
    from llm_usage.core.settings import Settings
    from llm_usage.domain.price_drift import PairDrift
    from llm_usage.domain.price_preview import PreviewLine
    from llm_usage.storage.pool import Connection

_HUNDRED = Decimal(100)


def tolerance_pct(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError("must be a percentage ≥ 0")
    return value


def add_price_checks(actions: PriceActions) -> None:
    """Register `drift` and `preview` under the `prices` group's actions."""
    drift = actions.add_parser(
        "drift", help="provider/model pairs whose upstream costs differ from the price table"
    )
    drift.set_defaults(price_action=_action(run_drift))
    drift.add_argument("--period", required=True, metavar="YYYY-MM")
    drift.add_argument("--tenant", metavar="ID", help="only this tenant's events")
    drift.add_argument(
        "--tolerance-pct",
        type=tolerance_pct,
        default=DEFAULT_TOLERANCE * _HUNDRED,
        metavar="PCT",
        help="how far an event's upstream cost may be from its list cost, in %% of the list "
        "cost (default 1; differences up to 0.000001 USD never count)",
    )
    drift.add_argument("--all", action="store_true", help="also list pairs without drift")
    drift.add_argument("--json", action="store_true", help="one JSON object a line")
    preview = actions.add_parser(
        "preview", help="a month's invoice lines under today's prices, beside what was billed"
    )
    preview.set_defaults(price_action=_action(run_preview))
    preview.add_argument("--period", required=True, metavar="YYYY-MM")
    preview.add_argument("--tenant", metavar="ID", help="only this tenant's lines")
    preview.add_argument("--json", action="store_true", help="one JSON object a line")


def _action(
    run: Callable[[argparse.Namespace, Settings], Awaitable[None]],
) -> Callable[[Settings, argparse.Namespace, TextIO], Awaitable[None]]:
    """`run` as a `prices` action (which prints to stdout itself)."""

    async def action(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
        await run(args, settings)

    return action


def _month(period: str) -> tuple[datetime, datetime]:
    first_day = parse_period(period)
    return (
        datetime.combine(first_day, time(0), UTC),
        datetime.combine(next_month(first_day), time(0), UTC),
    )


@asynccontextmanager
async def _read_only(settings: Settings) -> AsyncIterator[Connection]:
    """One connection in a read-only, repeatable-read transaction: the checks see one snapshot
    and cannot change anything."""
    import asyncpg  # noqa: PLC0415 - the database stack, when a command runs

    from llm_usage.storage.pool import CONNECTION_ERRORS, create_pool  # noqa: PLC0415

    pool = await create_pool(settings.database_url, size=1)
    try:
        async with (
            pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield connection
    except asyncpg.exceptions.UndefinedTableError:
        raise UserFacingError(
            "the database has no price table yet; run `llm-usage migrate` first"
        ) from None
    except CONNECTION_ERRORS as error:
        raise ServiceUnreachableError(
            f"lost the connection to PostgreSQL ({error or type(error).__name__}); try again "
            "once it is back (nothing was changed)"
        ) from None
    finally:
        await pool.close()


async def run_drift(args: argparse.Namespace, settings: Settings) -> None:
    from llm_usage.storage.price_checks import period_drift  # noqa: PLC0415

    period = checked_period(args.period)
    tenant = None if args.tenant is None else checked_tenant(args.tenant)
    tolerance = args.tolerance_pct / _HUNDRED
    start, end = _month(period)
    async with _read_only(settings) as connection:
        pairs = await period_drift(
            connection, start=start, end=end, tenant_id=tenant, tolerance=tolerance
        )
    shown = pairs if args.all else [pair for pair in pairs if pair.drifts]
    drifting = sum(pair.drifts for pair in pairs)
    _print_report(
        [drift_json(period, pair) for pair in shown],
        f"{period}: {drifting} of {len(pairs)} provider/model pairs with upstream costs differ "
        f"from the price table (tolerance {canonical_decimal(args.tolerance_pct)} %)",
        _drift_table(shown) if shown else None,
        as_json=args.json,
    )


def _print_report(
    objects: Sequence[dict[str, Any]], heading: str, table: str | None, *, as_json: bool
) -> None:
    """One JSON object a line, or a heading and a table for people."""
    if as_json:
        for item in objects:
            print(json.dumps(item))
        return
    print(heading)
    if table is not None:
        print(table)


def drift_json(period: str, pair: PairDrift) -> dict[str, Any]:
    return {
        "period": period,
        "provider": pair.provider,
        "model": pair.model,
        "events_compared": pair.compared,
        "events_beyond_tolerance": pair.beyond,
        "upstream_cost_usd": canonical_decimal(pair.upstream_usd),
        "list_cost_usd": canonical_decimal(pair.list_usd),
        "difference_usd": canonical_decimal(pair.difference_usd),
        "events_unpriced": pair.unpriced,
        "unpriced_upstream_cost_usd": canonical_decimal(pair.unpriced_upstream_usd),
    }


def _drift_table(pairs: Sequence[PairDrift]) -> str:
    headers = ["provider", "model", "compared", "beyond", "upstream USD", "list USD"]
    headers += ["difference USD", "unpriced"]
    rows = [
        (
            "(none)" if pair.provider is None else pair.provider,
            "(none)" if pair.model is None else pair.model,
            str(pair.compared),
            str(pair.beyond),
            canonical_decimal(pair.upstream_usd),
            canonical_decimal(pair.list_usd),
            canonical_decimal(pair.difference_usd),
            str(pair.unpriced),
        )
        for pair in pairs
    ]
    return aligned_table(headers, rows, right={2, 3, 4, 5, 6, 7})


async def run_preview(args: argparse.Namespace, settings: Settings) -> None:
    from llm_usage.domain.price_preview import preview_lines  # noqa: PLC0415
    from llm_usage.domain.prices import in_effect  # noqa: PLC0415
    from llm_usage.rollup.run import month_lines  # noqa: PLC0415
    from llm_usage.storage.price_checks import pair_usage  # noqa: PLC0415
    from llm_usage.storage.prices import load_prices  # noqa: PLC0415

    period = checked_period(args.period)
    tenant = None if args.tenant is None else checked_tenant(args.tenant)
    start, end = _month(period)
    now = worker_clock()()
    async with _read_only(settings) as connection:
        billed = await month_lines(connection, period=period, tenant_id=tenant)
        usage = await pair_usage(connection, start=start, end=end, tenant_id=tenant)
        table = await load_prices(connection, None)
    prices_now = {pair: row for pair, rows in table.items() if (row := in_effect(rows, now))}
    lines = preview_lines(period, billed.lines, usage, prices_now)
    state = "closed" if billed.closed else "open"
    _print_report(
        [preview_json(period, line) for line in lines],
        f"{period} ({state}): {len(lines)} lines under the price table in effect at "
        f"{now.astimezone(UTC).isoformat(timespec='seconds')}; nothing was changed",
        _preview_table(lines) if lines else None,
        as_json=args.json,
    )


def preview_json(period: str, line: PreviewLine) -> dict[str, Any]:
    return {
        "tenant_id": line.tenant_id,
        "period": period,
        "deployment_id": line.deployment_id,
        "billed_cents": line.billed_cents,
        "preview_cents": line.preview_cents,
        "difference_cents": line.difference_cents,
        "preview_usd": canonical_decimal(line.preview_usd),
        "events": line.events,
        "events_kept_at_billed_charge": line.kept_events,
    }


def _usd(cents: int) -> str:
    return str(cents_to_usd(cents))


def _preview_table(lines: Sequence[PreviewLine]) -> str:
    headers = ["tenant", "deployment", "billed USD", "today USD", "difference USD", "events"]
    headers += ["kept"]
    rows = [
        (
            line.tenant_id,
            "(none)" if line.deployment_id is None else line.deployment_id,
            _usd(line.billed_cents),
            _usd(line.preview_cents),
            _usd(line.difference_cents),
            str(line.events),
            str(line.kept_events),
        )
        for line in lines
    ]
    return aligned_table(headers, rows, right={2, 3, 4, 5, 6})
