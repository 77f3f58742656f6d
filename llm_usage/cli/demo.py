"""`llm-usage demo`: what `make run` runs (the stream and the consumers are
`llm_usage/local/demo.py`; a void, an amend and reconcile, `llm_usage/cli/demo_corrections.py`;
the invoice lines and the page, `llm_usage/cli/demo_page.py`)."""

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
    # Their stacks, when it runs.
    from llm_usage.cli.demo_corrections import show_corrections, show_reconcile  # noqa: PLC0415
    from llm_usage.cli.demo_page import show_invoice_lines, show_page  # noqa: PLC0415
    from llm_usage.local.demo import print_next_steps, run_demo  # noqa: PLC0415

    run = show_corrections(run_demo())
    show_invoice_lines(run)
    show_reconcile(run)
    show_page(run, serve=args.open)
    if not args.open:
        print_next_steps()
