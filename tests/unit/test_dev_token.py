"""The development secret file: made once, only ever whole, and remade when unusable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from llm_usage.core.settings import Settings
from llm_usage.local import dev_token
from llm_usage.local.dev_token import dev_api_secret, dev_secret_path

_NO_SECRET = Settings(api_jwt_secret=None)


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLM_USAGE_STATE_DIR", str(tmp_path))
    return tmp_path


def test_the_secret_is_made_once_private_and_without_leftovers(state: Path) -> None:
    first = dev_api_secret(_NO_SECRET)
    assert len(first) == 64
    assert dev_api_secret(_NO_SECRET) == first
    assert dev_secret_path().read_text(encoding="utf-8") == first + "\n"
    assert stat.S_IMODE(dev_secret_path().stat().st_mode) == 0o600
    assert [path.name for path in state.iterdir()] == [dev_token.SECRET_FILE]


@pytest.mark.parametrize("left", ["", "\n", "0123456789abcdef"])
def test_an_empty_or_short_file_is_replaced_by_a_whole_secret(state: Path, left: str) -> None:
    dev_secret_path().write_text(left, encoding="utf-8")
    secret = dev_api_secret(_NO_SECRET)
    assert len(secret) == 64
    assert dev_secret_path().read_text(encoding="utf-8") == secret + "\n"
    assert dev_api_secret(_NO_SECRET) == secret
    assert [path.name for path in state.iterdir()] == [dev_token.SECRET_FILE]


def test_a_secret_another_command_made_meanwhile_is_kept(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = "f" * 64
    link = os.link

    def racing_link(source: Path, target: Path) -> None:
        Path(target).write_text(theirs + "\n", encoding="utf-8")
        link(source, target)

    monkeypatch.setattr(os, "link", racing_link)
    assert dev_api_secret(_NO_SECRET) == theirs
    assert dev_secret_path().read_text(encoding="utf-8") == theirs + "\n"
    assert [path.name for path in state.iterdir()] == [dev_token.SECRET_FILE]


def test_api_jwt_secret_wins_and_no_file_is_made(state: Path) -> None:
    given = "s" * 40
    assert dev_api_secret(Settings(api_jwt_secret=SecretStr(given))) == given
    assert list(state.iterdir()) == []
