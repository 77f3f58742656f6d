"""The command line: person-fixable mistakes end in one line and a non-zero exit."""

from __future__ import annotations

import pytest

from llm_usage.cli.main import run


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
