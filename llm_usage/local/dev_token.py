"""The HS256 secret a local `serve api` checks development tokens with, kept in the state
directory so that a token printed by one command works with a server started by another."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from llm_usage.core.settings import Settings
from llm_usage.local.paths import state_dir

SECRET_FILE = "api-jwt-secret"  # noqa: S105 - a file name


def dev_secret_path() -> Path:
    return state_dir() / SECRET_FILE


def dev_api_secret(settings: Settings) -> str:
    """API_JWT_SECRET when set; else the state directory's development secret, made once."""
    if settings.api_jwt_secret is not None:
        return settings.api_jwt_secret.get_secret_value()
    path = dev_secret_path()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        secret = secrets.token_hex(32)
        handle.write(secret + "\n")
    return secret
