"""The id rule the contract sets for every id it carries (request, tenant, scope ids)."""

from __future__ import annotations

import re

# The contract's ids (`gateway_request_id`, `tenant_id`): no leading or trailing whitespace and
# no control characters (Unicode category Cc), which no gateway means and every person misreads.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
ID_JSON_PATTERN = r"^(?!\s)[^\u0000-\u001f\u007f-\u009f]*(?<!\s)$"
# What PostgreSQL text cannot hold: NUL, and a lone surrogate (no UTF-8 spelling).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def has_control_character(value: str) -> bool:
    return _CONTROL_CHARACTERS.search(value) is not None


def is_storable_text(value: str) -> bool:
    """Whether PostgreSQL text can hold `value` (asyncpg fails on it otherwise)."""
    return _UNSTORABLE.search(value) is None


def is_clean_id(value: str) -> bool:
    """Whether `value` has no leading or trailing whitespace and no control character."""
    return value == value.strip() and not has_control_character(value)
