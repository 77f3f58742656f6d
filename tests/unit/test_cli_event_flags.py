"""`llm-usage events void|amend|show`: what the flags ask for, and every mistake in them one line
and exit 2 before anything is read or published."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from llm_usage.cli.events import asked_changes, checked_request_id
from llm_usage.cli.main import build_parser, run
from llm_usage.core.errors import ConfigurationError


def _parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["events", *argv])


@pytest.mark.parametrize(
    ("flags", "changes"),
    [
        (["--input-tokens", "2000"], {"input_tokens": 2000}),
        (
            ["--output-tokens", "0", "--total-tokens", "12", "--cached-input-tokens", "3"],
            {"output_tokens": 0, "total_tokens": 12, "cached_input_tokens": 3},
        ),
        (["--reasoning-tokens", "7"], {"reasoning_tokens": 7}),
        # Money stays its digits: the decoder reads it exactly.
        (["--charge-usd", "0.00420"], {"customer_charge_usd": "0.00420"}),
        (["--charge-cents", "42"], {"customer_charge_cents": 42}),
        (["--deployment-id", "dep-7", "--no-user"], {"deployment_id": "dep-7", "user_id": None}),
        (
            ["--agent-id", "agent 2", "--no-deployment"],
            {"agent_id": "agent 2", "deployment_id": None},
        ),
        (["--no-agent"], {"agent_id": None}),
    ],
)
def test_amend_flags_become_the_changed_fields(flags: list[str], changes: dict[str, Any]) -> None:
    args = _parsed("amend", "--id", "req-1", "--reason", "wrong unit", *flags)
    assert asked_changes(args) == changes
    assert (args.gateway_request_id, args.reason, args.tenant, args.json) == (
        "req-1", "wrong unit", None, False,
    )  # fmt: skip


def test_an_amend_without_a_field_is_refused() -> None:
    args = _parsed("amend", "--id", "req-1", "--reason", "r")
    with pytest.raises(ConfigurationError, match="at least one field"):
        asked_changes(args)


def test_void_and_show_take_the_shared_flags() -> None:
    void = _parsed(
        "void", "--id", "req-1", "--reason", "test traffic", "--tenant", "t1",
        "--correction-id", "c-1", "--actor", "alice", "--occurred-at", "2026-01-01T00:00:00Z",
        "--event-occurred-at", "2025-12-31", "--json",
    )  # fmt: skip
    assert (void.events_command, void.tenant, void.correction_id, void.actor) == (
        "void", "t1", "c-1", "alice",
    )  # fmt: skip
    assert (void.occurred_at, void.event_occurred_at, void.json) == (
        "2026-01-01T00:00:00Z", "2025-12-31", True,
    )  # fmt: skip
    show = _parsed("show", "--id", "req-1")
    assert (show.events_command, show.tenant, show.json) == ("show", None, False)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["events", "amend", "--id", "r", "--reason", "x", "--input-tokens", "-1"], "at least 0"),
        (["events", "amend", "--id", "r", "--reason", "x", "--output-tokens", "many"], "many"),
        (
            ["events", "amend", "--id", "r", "--reason", "x", "--user-id", "u", "--no-user"],
            "not allowed with",
        ),
        (["events", "void", "--id", "r"], "--reason"),
        (["events", "void", "--reason", "x"], "--id"),
        (["events", "void", "--id", "r", "--reason", "x", "--input-tokens", "1"], "unrecognized"),
        (["events", "show", "--id", "r", "--reason", "x"], "unrecognized"),
        (["events", "redo", "--id", "r"], "invalid choice"),
    ],
)
def test_a_mistake_in_the_flags_is_one_line_and_exit_2(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        run(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert words in err
    if argv[1] != "redo":  # the group's own choice is argparse's, with its usage
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("text", ["", " req", "req\t1", "req\x00", "r" * 201])
def test_an_id_against_the_contracts_rule_is_refused(text: str) -> None:
    with pytest.raises(ConfigurationError, match="--id"):
        checked_request_id(text)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["events", "show", "--id", " req"], "--id must have no leading"),
        (["events", "show", "--id", "req", "--tenant", " t"], "--tenant"),
        (["events", "show", "--id", "req", "--event-occurred-at", "soon"], "--event-occurred-at"),
        (["events", "void", "--id", "req", "--reason", "x", "--occurred-at", "x"], "--occurred-at"),
        (["events", "amend", "--id", "req", "--reason", "x"], "at least one field"),
    ],
)
def test_a_bad_value_is_one_line_before_the_database_is_reached(
    argv: list[str],
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No database there: the flags are judged first.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/nowhere")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert words in err
