"""The command line: person-fixable mistakes end in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from llm_usage.cli.main import COMMAND_GROUPS, build_parser, run


def test_bad_configuration_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METRICS_PORT", "abc")
    assert run(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("llm-usage: error: METRICS_PORT")


def test_unreachable_database_is_one_line_naming_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 9 (discard) on loopback is closed on any sane test machine.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/nowhere")
    assert run(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot reach PostgreSQL" in err
    assert "DATABASE_URL" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["consume", "usage", "--exit-when-idle", "-1"],
        ["consume", "usage", "--exit-when-idle", "soon"],
        ["consume", "nonsense"],
        ["topics", "ensure", "--partitions", "0"],
        ["bench", "ingest", "--dup-rate", "1.5"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        run(argv)
    assert raised.value.code == 2
    assert "usage: llm-usage" in capsys.readouterr().err


GROUP_COMMANDS = [
    "migrate",
    "maintain",
    "consume",
    "topics",
    "dev",
    "demo",
    "bench",
    "rollup",
    "reconcile",
    "dlq",
    "events",
    "policy",
    "prices",
    "budget",
    "archive",
    "serve",
    "soak",
]


def _top_level_commands(parser: argparse.ArgumentParser) -> list[str]:
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(commands.choices)


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], list[argparse.ArgumentParser]]]:
    """Every command that runs, as its words and the parsers from the top down to it."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [(path, [parser])]
    return [
        (words, [parser, *parsers])
        for group in groups
        for name, child in group.choices.items()
        for words, parsers in _leaves(child, (*path, name))
    ]


def test_the_table_registers_every_group_once() -> None:
    registered = []
    for module in COMMAND_GROUPS:
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_parser(parser.add_subparsers())
        registered += _top_level_commands(parser)
    assert registered == GROUP_COMMANDS
    assert _top_level_commands(build_parser()) == GROUP_COMMANDS


def test_every_command_has_one_runner() -> None:
    leaves = _leaves(build_parser())
    assert len(leaves) > len(GROUP_COMMANDS)
    for words, parsers in leaves:
        runners = [p.get_default("run") for p in parsers if p.get_default("run") is not None]
        assert len(runners) == 1, words
        assert callable(runners[0]), words


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        run(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out == f"llm-usage {version('llm-usage-pipeline')}\n"


def test_help_describes_the_whole_system(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for part in ("exactly once", "budget", "alerts", "invoice lines", "HTTP API", "operations"):
        assert part in out


def _without(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make `packages` (and their modules) impossible to import, as in the production image."""
    for name in list(sys.modules):
        if name.startswith(tuple(f"{package}." for package in packages)):
            monkeypatch.delitem(sys.modules, name)
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def test_a_missing_harness_leaves_the_rest_working(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "llm_usage.bench", "llm_usage.soak")
    assert _top_level_commands(build_parser()) == [
        command for command in GROUP_COMMANDS if command not in ("bench", "soak")
    ]
    with pytest.raises(SystemExit) as raised:
        run(["bench", "ingest"])
    assert raised.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    monkeypatch.setenv("METRICS_PORT", "abc")
    assert run(["migrate"]) == 2
    assert capsys.readouterr().err.startswith("llm-usage: error: METRICS_PORT")


def test_a_missing_product_group_is_an_error_not_a_missing_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, "llm_usage.cli.dlq")
    with pytest.raises(ModuleNotFoundError):
        build_parser()


def test_a_harness_missing_a_dependency_is_an_error_not_a_missing_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "llm_usage.bench.cli", raising=False)
    monkeypatch.setitem(sys.modules, "llm_usage.cli.args", None)  # what bench.cli imports
    with pytest.raises(ModuleNotFoundError):
        build_parser()


def test_a_local_command_reads_no_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METRICS_PORT", "abc")
    monkeypatch.setenv("LLM_USAGE_STATE_DIR", str(tmp_path))
    assert run(["dev", "env"]) == 2
    assert capsys.readouterr().err == (
        "llm-usage: error: nothing is running; run `llm-usage dev up`\n"
    )


def test_building_the_command_line_imports_no_worker_stack() -> None:
    """`llm-usage --help` imports every group; each imports its stack only when it runs."""
    code = (
        "import sys; from llm_usage.cli.main import build_parser; build_parser(); "
        "heavy = {'asyncpg', 'aiokafka', 'pydantic', 'structlog', 'fastapi', 'httpx'} "
        "& {name.split('.')[0] for name in sys.modules}; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
