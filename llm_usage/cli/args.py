"""What every command group shares: the `Commands` type, argument types, the one-line parser.

A group is a module with `add_parser(commands)`, which registers its parsers and gives each
command `set_defaults(run=...)`. `run(args, settings)` gets the parsed arguments and the
environment's settings and may return a coroutine, which is then run. A command that finds or
starts local services of its own (dev, demo) also sets `local=True`: it is called as `run(args)`,
reads no settings and logs only warnings, readably, for a person at a terminal.

Light on purpose: `llm-usage --help` imports every group, and no group imports a worker's stack
before its command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from typing import NoReturn, TypeAlias

from llm_usage.core.errors import ConfigurationError
from llm_usage.domain.periods import InvalidPeriodError, parse_period
from llm_usage.domain.policies import InvalidPolicyError, check_tenant_id

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def number_of_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_seconds(text: str) -> float:
    value = number_of_seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def non_negative_int(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return value


def checked_period(text: str) -> str:
    """`--period YYYY-MM`, checked when the command runs: a bad one is one line and exit 2."""
    try:
        parse_period(text)
    except InvalidPeriodError as error:
        raise ConfigurationError(f"--period: {error}") from None
    return text


def checked_tenant(text: str) -> str:
    """`--tenant ID`, checked when the command runs: a bad one is one line and exit 2."""
    try:
        return check_tenant_id(text)
    except InvalidPolicyError as error:
        raise ConfigurationError(f"--tenant {error.problem}") from None


def checked_instant(flag: str, text: str | None) -> datetime | None:
    """An RFC 3339 time or a date (`--at`, `--effective-from`), checked when the command runs."""
    from llm_usage.api.params import parse_instant  # noqa: PLC0415 - when a command runs

    if text is None:
        return None
    try:
        return parse_instant(text)
    except (ValueError, OverflowError) as error:
        raise ConfigurationError(f"{flag} {error}, not {text!r}") from None


class OneLineArgumentParser(argparse.ArgumentParser):
    """A parser whose mistakes end in one line on stderr and exit 2, like every other
    person-fixable error of these commands (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"llm-usage: error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Left to the top-level parser, arguments this one does not know would be reported
        # with the whole usage of `llm-usage`; as a sub-command, say it here, in one line.
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown
