"""A COPY's unique violation on Citus (SQLSTATE XX000) is a unique violation there, only there."""

from __future__ import annotations

import asyncpg

from llm_usage.storage.flavour import is_unique_violation

_ON_A_WORKER = 'duplicate key value violates unique constraint "usage_event_ids_p12_pkey_102324"'


def test_a_unique_violation_is_one_on_either_flavour() -> None:
    error = asyncpg.exceptions.UniqueViolationError("duplicate key value")
    assert is_unique_violation(error, citus=False)
    assert is_unique_violation(error, citus=True)


def test_an_internal_error_naming_a_duplicate_key_is_one_on_citus_only() -> None:
    error = asyncpg.exceptions.InternalServerError(_ON_A_WORKER)
    assert is_unique_violation(error, citus=True)
    assert not is_unique_violation(error, citus=False)


def test_another_internal_error_is_not_one() -> None:
    error = asyncpg.exceptions.InternalServerError("could not connect to worker")
    assert not is_unique_violation(error, citus=True)
