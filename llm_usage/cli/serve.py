"""`llm-usage serve api`: the HTTP API (see api/ and the contract's HTTP API section)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llm_usage.cli.args import Commands

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings


def add_parser(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="serve the HTTP API until SIGTERM/SIGINT")
    serve.set_defaults(run=run_serve_command)
    services = serve.add_subparsers(dest="serve_command", required=True, metavar="SERVICE")
    services.add_parser(
        "api",
        help="usage and budget reads, policy changes, invoice lines, HTTP ingest "
        "(API_HOST, API_PORT, API_JWT_SECRET or API_JWT_JWKS_FILE, API_JWT_AUDIENCE)",
    )


async def run_serve_command(args: argparse.Namespace, settings: Settings) -> None:
    from llm_usage.api.server import serve_api  # noqa: PLC0415 - the web stack, late

    await serve_api(settings)
