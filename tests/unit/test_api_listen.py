"""API_REUSE_PORT: several `serve api` processes may share a port only when each asks for it."""

from __future__ import annotations

import pytest

from llm_usage.api.server import bind
from llm_usage.core.errors import ConfigurationError


def test_listeners_that_ask_for_it_share_a_port() -> None:
    first = bind("127.0.0.1", 0, reuse_port=True)
    try:
        port = first.getsockname()[1]
        second = bind("127.0.0.1", port, reuse_port=True)
        assert second.getsockname()[1] == port
        second.close()
    finally:
        first.close()


def test_without_it_a_taken_port_is_still_refused() -> None:
    first = bind("127.0.0.1", 0, reuse_port=True)
    try:
        with pytest.raises(ConfigurationError, match="cannot listen"):
            bind("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()
