"""ARCHIVE_URL and the ARCHIVE_S3_* settings: each usable form gives its target, each mistake is
one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_usage.archive.targets import archive_target, default_archive_dir
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import load_settings


def test_unset_is_the_data_directory_not_the_temporary_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    target = archive_target(load_settings(archive_url=""))
    assert target.local
    assert target.root == str(tmp_path / "llm-usage-pipeline" / "archive")
    assert default_archive_dir() == tmp_path / "llm-usage-pipeline" / "archive"


@pytest.mark.parametrize("form", ["{dir}", "file://{dir}"])
def test_a_directory_or_a_file_url(form: str, tmp_path: Path) -> None:
    target = archive_target(load_settings(archive_url=form.format(dir=tmp_path)))
    assert target.local
    assert target.root == str(tmp_path)
    assert target.months() == []


def test_an_s3_url_with_an_endpoint_and_keys() -> None:
    settings = load_settings(
        archive_url="s3://archive-bucket/events/eu/",
        archive_s3_endpoint_url="http://127.0.0.1:7070",
        archive_s3_access_key_id="key",
        archive_s3_secret_access_key="s3-test-password",  # noqa: S106 - a test value
    )
    target = archive_target(settings)
    assert not target.local
    assert target.root == "archive-bucket/events/eu"
    assert target.month_dir("2024-03") == "archive-bucket/events/eu/2024-03"
    assert "s3-test-password" not in repr(settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"archive_url": "gs://bucket/x"}, "ARCHIVE_URL: gs:// is not offered"),
        ({"archive_url": "s3:///prefix"}, "names no bucket"),
        (
            {"archive_url": "s3://b/p", "archive_s3_access_key_id": "k"},
            "ARCHIVE_S3_ACCESS_KEY_ID and ARCHIVE_S3_SECRET_ACCESS_KEY go together",
        ),
        (
            {"archive_url": "s3://b/p", "archive_s3_endpoint_url": "127.0.0.1:7070"},
            "ARCHIVE_S3_ENDPOINT_URL: '127.0.0.1:7070' is not an http(s) URL",
        ),
    ],
)
def test_each_mistake_is_one_line(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        archive_target(load_settings(**settings))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
