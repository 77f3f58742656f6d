"""Development tokens for the local API: the HS256 secret a local `serve api` checks them with,
kept in the state directory so a token printed by one command works with a server started by
another."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import jwt

from llm_usage.api.auth import SECRET_ALGORITHM, Role
from llm_usage.core.settings import Settings
from llm_usage.local.paths import state_dir

SECRET_FILE = "api-jwt-secret"  # noqa: S105 - a file name
DEV_TOKEN_HOURS = 24


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


def dev_token(
    secret: str,
    *,
    audience: str,
    tenant_id: str,
    role: Role = Role.TENANT_ADMIN,
    hours: int = DEV_TOKEN_HOURS,
) -> str:
    """A token for `tenant_id`, valid for `hours`, signed with `secret`."""
    claims = {
        "aud": audience,
        "exp": int(time.time()) + hours * 3600,
        "sub": "demo@localhost",
        "role": role.value,
        "tenant_id": tenant_id,
    }
    return jwt.encode(claims, secret, algorithm=SECRET_ALGORITHM)
