"""`llm-usage demo`: what `make run` runs (the demo itself is `llm_usage/local/demo.py`)."""

from __future__ import annotations

import argparse

from llm_usage.cli.args import Commands


def add_parser(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo", help="run a short demo stream through the pipeline (make run)"
    )
    demo.add_argument(
        "--open",
        action="store_true",
        help="at the end, serve the API on 127.0.0.1 (API_PORT, default 8080) for the printed "
        "page address until Ctrl-C",
    )
    demo.set_defaults(run=run_demo_command, local=True)


def run_demo_command(args: argparse.Namespace) -> None:
    from llm_usage.local.demo import run_demo  # noqa: PLC0415 - its stack, when it runs

    run_demo(serve=args.open)
