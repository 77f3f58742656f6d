"""The HS256 secret a local `serve api` checks development tokens with, kept in the state
directory so that a token printed by one command works with a server started by another."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

from llm_usage.core.settings import Settings
from llm_usage.local.paths import state_dir

SECRET_FILE = "api-jwt-secret"  # noqa: S105 - a file name
# The API refuses a shorter HS256 secret (api.auth.MIN_SECRET_BYTES; this layer cannot import it).
_MIN_SECRET_LENGTH: Final = 32


def dev_secret_path() -> Path:
    return state_dir() / SECRET_FILE


def dev_api_secret(settings: Settings) -> str:
    """API_JWT_SECRET when set; else the state directory's development secret, made once.

    The file appears only whole: the secret is written to a temporary file first and linked into
    place. A file too short to be a secret (left empty by an older version's crash, say) counts as
    absent and is replaced."""
    if settings.api_jwt_secret is not None:
        return settings.api_jwt_secret.get_secret_value()
    path = dev_secret_path()
    kept = _usable_secret(path)
    if kept is not None:
        return kept
    secret = secrets.token_hex(32)
    staging = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # A link, not a rename, where no file is: it fails rather than replace the secret
            # another command has just made (and perhaps signed a token with).
            os.link(staging, path)
        except FileExistsError:
            kept = _usable_secret(path)
            if kept is not None:
                return kept
            os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    return secret


def _usable_secret(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text if len(text) >= _MIN_SECRET_LENGTH else None
