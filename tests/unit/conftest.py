"""Unit tests: pure logic, no services."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """A test that configured logging onto a captured stream must not leave it to the next."""
    yield
    structlog.reset_defaults()
